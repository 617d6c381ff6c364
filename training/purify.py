"""Purify a (possibly backdoored) CLIP with a few clean labelled images per class.

    python -m training.purify --method rvpt --model MODEL --data DATA --shots 16 --out PURIFIED

Methods: rvpt (visual prompts, training/rvpt.py), cbpt (class-wise text contexts,
training/cbpt.py; the artifact has no visual prompts, only the purified class
embeddings) and rvpt+cbpt (both: --schedule joint, the default, trains both at
once; sequential trains RVPT, then CBPT on the prompted image tower; see
docs/cbpt.md). The RVPT options below set RVPT only; CBPT has its own
(--cbpt-epochs, --cbpt-lr, ...).

Baselines (training/baselines.py, docs/baselines.md), written as the same artifact
so that they serve through the same runtime: none (the unchanged model: template
class embeddings, no prompts), vpt (RVPT with alpha 0; the RVPT options apply,
--alpha must stay 0), linear-probe (frozen image tower, a cosine linear head stored
as the class embeddings; --probe-*), ft (contrastive fine-tuning of both towers;
--ft-*) and cleanclip (FT plus in-modality self-supervised losses; --ft-*, --ss-weight).
Options of a method that is not run are errors.

Extension, not in either paper (off by default): --unlearn-weight W > 0 with rvpt,
vpt or rvpt+cbpt --schedule sequential first inverts a trigger for every class from
the shots (training/inversion.py, Neural Cleanse) and adds W * CE on the shots
stamped with the suspected target's trigger to RVPT's loss; --unlearn-refresh R
re-inverts it through the prompts every R epochs and unlearns every trigger found
until the target is no longer anomalously easy to reach (--unlearn-refresh-stop);
--distill-weight K adds K x distillation of the frozen model's predictions on the clean
shots, which keeps clean accuracy, and --distill-mixup M the same on mixed pairs of
clean shots; --unlearn-targets frozen has the stamped shots learn the frozen model's
predictions too, instead of their labels. The inversion's findings go to the
JSON and the manifest's metrics (docs/reference-benchmark.md).

MODEL: anything `training.models.load_clip` reads (open_clip local dir, checkpoint
file, NAME:TAG). DATA: fashion-mnist, digits or an ImageFolder directory. Few-shot
images come from the training split, metrics from the test split (--test-limit N:
a seeded random N of them). When the model directory records its trigger (zoo
models), or --attack names one, the summary includes ASR. Exit codes: 0 done, 2 bad
input or model.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from guard.artifact import save_artifact
from guard.errors import ClipGuardError, InputError
from .models import load_clip
from guard.prompted import PromptedCLIP, PromptedVisionEncoder
from .text import DEFAULT_TEMPLATES, TextEncoder, class_text_features

from .attacks import TRIGGER_JSON, Backdoor, load_trigger
from .baselines import FinetuneConfig, LinearProbeConfig, finetune, train_linear_probe
from .cbpt import CBPTConfig, POSITIVE_CHOICES, purified_text_features, train_cbpt, train_joint
from .data import few_shot, load_dataset
from .evaluate import Evaluation, evaluate, format_summary
from .inversion import invert_triggers
from .rvpt import EXTENSION_SETTINGS, UNLEARN_TARGETS, RVPTConfig, train_rvpt

log = logging.getLogger(__name__)

METHODS = ("rvpt", "cbpt", "rvpt+cbpt", "none", "vpt", "linear-probe", "ft", "cleanclip")
SCHEDULES = ("joint", "sequential")


@dataclass(frozen=True)
class PurifyResult:
    out: Path
    before: Evaluation
    after: Evaluation
    seconds: float
    train_seconds: Optional[float] = None
    classifier: Optional[PromptedCLIP] = field(default=None, repr=False, compare=False)  # the model in memory
    inversion: Optional[dict] = None  # training.inversion's findings, when RVPT unlearned an inverted trigger

    def to_dict(self) -> dict:
        return {"out": str(self.out), "before": self.before.to_dict(), "after": self.after.to_dict(),
                "seconds": self.seconds, "train_seconds": self.train_seconds,
                **({} if self.inversion is None else {"inversion": self.inversion})}


def find_backdoor(model_spec: str, attack: Optional[str]) -> Optional[Backdoor]:
    """The trigger recorded with --attack, else with the model directory itself, else None."""
    if attack:
        return load_trigger(Path(attack))
    if (Path(model_spec) / TRIGGER_JSON).is_file():
        return load_trigger(Path(model_spec))
    return None


def purify(model: str, data: str, out: str | Path, *, method: str = "rvpt", shots: int = 16,
           templates: Sequence[str] = DEFAULT_TEMPLATES, attack: Optional[str] = None,
           pr_images: int = 2000, seed: int = 0, device: str = "cpu", progress: bool = False,
           quick_gelu: Optional[bool] = None, arch: Optional[str] = None, cbpt: Optional[dict] = None,
           schedule: str = "joint", probe: Optional[dict] = None, ft: Optional[dict] = None,
           before: Optional[Evaluation] = None, test_limit: Optional[int] = None,
           **hyperparameters) -> PurifyResult:
    """Learn the method's prompts (or head, or weights), evaluate before and after, write
    the artifact to `out`. `hyperparameters` override RVPT's defaults (see RVPTConfig;
    also for vpt, whose alpha is 0), `cbpt` CBPT's (see CBPTConfig), `probe` the linear
    probe's (LinearProbeConfig), `ft` those of ft and cleanclip (FinetuneConfig);
    `schedule` ("sequential" or "joint") only matters for rvpt+cbpt.
    `before`: an evaluation of this model on the same test images (same test_limit and
    seed) to report instead of evaluating it again. `test_limit`: evaluate on a random
    subset of this many test images, drawn with `seed` (all when None)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
    uses_rvpt, uses_cbpt = method in ("rvpt", "vpt", "rvpt+cbpt"), method in ("cbpt", "rvpt+cbpt")
    uses_probe, uses_ft = method == "linear-probe", method in ("ft", "cleanclip")
    stray_rvpt = sorted(name for name, value in hyperparameters.items() if value is not None)
    if stray_rvpt and not uses_rvpt:
        raise InputError(f"{stray_rvpt} are RVPT settings and method {method!r} has no RVPT stage; "
                         "set the method's own with cbpt=, probe= or ft={...} (--cbpt-epochs, --probe-epochs, "
                         "--ft-epochs, ... on the command line)")
    if not uses_cbpt and _given(cbpt):
        raise InputError(f"CBPT settings were given but method {method!r} has no CBPT stage; use --method cbpt "
                         "or rvpt+cbpt")
    probe, ft = _given(probe), _given(ft)
    if probe and not uses_probe:
        raise InputError(f"linear-probe settings {sorted(probe)} were given but method {method!r} trains no "
                         "probe; use --method linear-probe")
    if ft and not uses_ft:
        raise InputError(f"FT settings {sorted(ft)} were given but method {method!r} does not fine-tune; "
                         "use --method ft or cleanclip")
    extensions = [name for name in EXTENSION_SETTINGS if hyperparameters.get(name)]
    if method == "rvpt+cbpt" and schedule == "joint" and extensions:
        raise InputError(f"{', '.join(extensions)} is supported for rvpt, vpt and rvpt+cbpt --schedule "
                         "sequential, not the joint schedule")
    if method == "vpt" and hyperparameters.get("alpha") not in (None, 0):
        raise InputError(f"vpt is RVPT with alpha 0, got alpha {hyperparameters['alpha']}; "
                         "use --method rvpt for a repelling weight")
    if method == "ft" and ft.get("self_supervised_weight") not in (None, 0):
        raise InputError(f"ft has no self-supervised loss, got a weight of {ft['self_supervised_weight']}; "
                         "use --method cleanclip")
    if test_limit is not None and (isinstance(test_limit, bool) or not isinstance(test_limit, int)
                                   or test_limit < 1):
        raise InputError(f"test_limit must be a positive integer (or None for all), got {test_limit!r}")
    if before is not None and not isinstance(before, Evaluation):
        raise InputError(f"before must be a training.evaluate.Evaluation, got {type(before).__name__}")
    cbpt_config = CBPTConfig.with_overrides(**{"seed": seed, **(cbpt or {})}) if uses_cbpt else None
    probe_config = LinearProbeConfig.with_overrides(**{"seed": seed, **probe}) if uses_probe else None
    ft_config = (FinetuneConfig.with_overrides(**{"seed": seed, "self_supervised_weight":
                                                  1.0 if method == "cleanclip" else 0.0, **ft})
                 if uses_ft else None)
    started = time.perf_counter()
    loaded = load_clip(model, arch=arch, quick_gelu=quick_gelu, device=device)
    preprocess = loaded.preprocess
    train = load_dataset(data, "train", image_size=preprocess.image_size)
    test = load_dataset(data, "test", image_size=preprocess.image_size)
    if test_limit is not None and test_limit < len(test):
        chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:test_limit]
        test = test.subset(chosen.sort().values)
    if before is not None and before.num_images != len(test):
        raise InputError(f"before was evaluated on {before.num_images} test images, this run evaluates "
                         f"{len(test)}: pass the same test_limit")
    shot_set = few_shot(train, shots, seed)
    backdoor = find_backdoor(model, attack)
    encoder = PromptedVisionEncoder(loaded.model.visual)
    text_encoder = TextEncoder(loaded.model)
    text_features = class_text_features(text_encoder, loaded.tokenizer, train.classes, templates)
    logit_scale = loaded.model.logit_scale.exp().item()
    if before is None:
        log.info("evaluating the model before purification")
        before = evaluate(PromptedCLIP(encoder, text_features, logit_scale), preprocess, test, backdoor,
                          pr_images, seed, progress)
    rvpt_config = None
    if uses_rvpt:
        overrides = {**hyperparameters, "alpha": 0.0} if method == "vpt" else hyperparameters
        rvpt_config = RVPTConfig.for_encoder(encoder, seed=seed, **overrides)
    log.info("training %s with %s", method, {"rvpt": rvpt_config, "cbpt": cbpt_config, "schedule": schedule,
                                             "linear_probe": probe_config, "finetune": ft_config})
    train_started = time.perf_counter()
    prompts, final_epoch, recorded, inversion = None, None, {}, None
    if rvpt_config is not None and rvpt_config.unlearn_weight:
        inversion = invert_triggers(encoder, text_features, logit_scale, preprocess, shot_set,
                                    rvpt_config.unlearn_steps, rvpt_config.unlearn_mask_weight, seed, progress)
        log.info("trigger inversion suspects %r (anomaly index %.2f)", train.classes[inversion.suspected],
                 inversion.anomaly_index[inversion.suspected])
    if method in ("rvpt", "vpt"):
        prompts, history = train_rvpt(encoder, text_features, logit_scale, preprocess, shot_set, rvpt_config,
                                      progress, inversion)
        final_epoch = history[-1]
        recorded = rvpt_config.to_dict()
    elif uses_probe:  # the head is the class embeddings: PromptedCLIP computes the cosine probe
        text_features, history = train_linear_probe(encoder, logit_scale, preprocess, shot_set, probe_config,
                                                    progress, device=text_features.device)
        final_epoch, recorded = history[-1], {"linear_probe": probe_config.to_dict()}
    elif uses_ft:  # both towers change in place: re-embed the classes, re-read the logit scale
        history = finetune(loaded.model, loaded.tokenizer, preprocess, shot_set, ft_config, progress)
        text_features = class_text_features(text_encoder, loaded.tokenizer, train.classes, templates)
        logit_scale = loaded.model.logit_scale.exp().item()
        final_epoch, recorded = history[-1], {"finetune": ft_config.to_dict()}
    elif uses_cbpt:
        text_args = (encoder, text_encoder, loaded.tokenizer, train.classes, logit_scale, preprocess, shot_set,
                     cbpt_config)
        if method == "cbpt":
            context, history = train_cbpt(*text_args, progress=progress)
            final_epoch, recorded = history[-1], {"cbpt": cbpt_config.to_dict()}
        elif schedule == "sequential":  # RVPT against the template embeddings, then CBPT on its prompted tower
            prompts, rvpt_history = train_rvpt(encoder, text_features, logit_scale, preprocess, shot_set,
                                               rvpt_config, progress, inversion)
            context, history = train_cbpt(*text_args, visual_prompts=prompts, progress=progress)
            final_epoch = {"rvpt": rvpt_history[-1], "cbpt": history[-1]}
        else:
            context, prompts, history = train_joint(*text_args, rvpt_config, progress=progress)
            final_epoch = history[-1]
        if method == "rvpt+cbpt":
            recorded = {"rvpt": rvpt_config.to_dict(), "cbpt": cbpt_config.to_dict(), "schedule": schedule}
        text_features = purified_text_features(text_encoder, context)
    train_seconds = time.perf_counter() - train_started
    classifier = PromptedCLIP(encoder, text_features, logit_scale, prompts).eval()
    # no defense: the model is the one just evaluated, so "after" is "before"
    after = before if method == "none" else evaluate(classifier, preprocess, test, backdoor, pr_images, seed,
                                                     progress)
    seconds = time.perf_counter() - started
    save_artifact(
        out, base_model=loaded.identity.to_dict(), vision_state=loaded.model.visual.state_dict(),
        visual_prompts=None if prompts is None else prompts.tokens,
        prompt_start_block=None if prompts is None else prompts.start_block, text_features=text_features,
        logit_scale=logit_scale, classes=train.classes, templates=templates, preprocess=preprocess,
        method=method, hyperparameters={**recorded, "shots": shots, "data": data},
        metrics={"before": before.to_dict(), "after": after.to_dict(), "final_epoch": final_epoch,
                 "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1),
                 **({} if inversion is None else {"inversion": inversion.to_dict(train.classes)})})
    return PurifyResult(Path(out), before, after, seconds, train_seconds, classifier,
                        None if inversion is None else inversion.to_dict(train.classes))


def _given(settings: Optional[dict]) -> dict:
    """The settings that were actually given (None means "the default")."""
    return {name: value for name, value in (settings or {}).items() if value is not None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.purify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="rvpt", choices=METHODS)
    parser.add_argument("--model", required=True, help="CLIP to purify (directory, checkpoint or NAME:TAG)")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, digits or an ImageFolder path")
    parser.add_argument("--shots", type=int, default=16, help="clean labelled images per class (default 16)")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--template", action="append", help="class prompt template, '{}' for the name (repeatable)")
    parser.add_argument("--attack", help="backdoored model directory whose trigger to measure ASR with")
    parser.add_argument("--json", type=Path, help="also write the before/after metrics here")
    group = parser.add_argument_group("RVPT hyperparameters (default: the paper's, scaled to the model)")
    group.add_argument("--alpha", type=float, help="weight of the feature-repelling loss (2; --method vpt: 0)")
    group.add_argument("--margin", type=float, help="FR margin m in max(cos, m) (-1 = full repulsion)")
    group.add_argument("--prompt-tokens", dest="num_tokens", type=int, help="prompt tokens per block")
    group.add_argument("--prompt-start", dest="start_block", type=int, help="first prompted block (J)")
    group.add_argument("--epochs", type=int, help="RVPT training epochs (50)")
    group.add_argument("--lr", type=float, help="RVPT SGD learning rate (0.002)")
    group.add_argument("--batch-size", type=int, help="RVPT batch size (32)")
    group.add_argument("--unlearn-weight", type=float, help="extension, not in the paper: weight of unlearning a "
                       "trigger inverted from the shots (0: off; docs/reference-benchmark.md)")
    group.add_argument("--unlearn-steps", type=int,
                       help="steps of that trigger inversion (300)")
    group.add_argument("--unlearn-mask-weight", type=float,
                       help="L1 weight of the inverted mask (0.01)")
    group.add_argument("--unlearn-refresh", type=int, help="re-invert the trigger through the prompts every this "
                       "many epochs and unlearn every trigger found (0: never, the default)")
    group.add_argument("--unlearn-refresh-steps", type=int, help="inversion steps per refresh (10)")
    group.add_argument("--unlearn-refresh-stop", type=float, help="stop refreshing once the refined mask's L1 "
                       "exceeds this x the median over all classes of the first inversion (1)")
    group.add_argument("--unlearn-targets", choices=UNLEARN_TARGETS, help="what the stamped shots learn: their "
                       "labels (the default) or the frozen model's predictions on the clean shots")
    group.add_argument("--distill-weight", type=float, help="extension, not in the paper: weight of distilling "
                       "the frozen model's predictions on the clean shots (0: off)")
    group.add_argument("--distill-temperature", type=float, help="temperature of that distillation (2)")
    group.add_argument("--distill-mixup", type=float, help="extension, not in the paper: weight of distilling "
                       "the frozen model's predictions on mixed pairs of clean shots (0: off)")
    text = parser.add_argument_group("CBPT hyperparameters (default: the paper's, see training/cbpt.py)")
    text.add_argument("--schedule", default="joint", choices=SCHEDULES,
                      help="rvpt+cbpt: both at once (joint, default) or RVPT then CBPT (sequential)")
    text.add_argument("--context-length", dest="num_context", type=int, help="context tokens per class (4)")
    text.add_argument("--context-position", dest="position", choices=("end", "middle", "front"),
                      help="where the class name sits relative to the context (end)")
    text.add_argument("--positive", choices=POSITIVE_CHOICES, help="positive sample of the trigger inversion "
                      "(farthest)")
    text.add_argument("--rho", type=float, help="l2 radius of the inverted trigger on [0, 1] pixels (6/255)")
    text.add_argument("--inversion-steps", type=int, help="SGD steps of the trigger inversion (10)")
    text.add_argument("--inversion-lr", type=float, help="learning rate of the trigger inversion (0.1)")
    text.add_argument("--trigger-weight", type=float, help="a in L_bn (1)")
    text.add_argument("--adv-weight", type=float, help="weight of L_adv (0.4)")
    text.add_argument("--align-weight", type=float, help="weight of L_align (0.4)")
    text.add_argument("--warmup-epochs", type=int, help="first epochs with L_bn only (5)")
    text.add_argument("--cbpt-epochs", type=int, help="CBPT training epochs (20)")
    text.add_argument("--cbpt-lr", type=float, help="CBPT SGD learning rate (0.002)")
    text.add_argument("--cbpt-batch-size", type=int, help="CBPT batch size (32)")
    probe = parser.add_argument_group("linear-probe hyperparameters (default: METHODS.md's, see training/baselines.py)")
    probe.add_argument("--probe-epochs", type=int, help="linear-probe training epochs (40)")
    probe.add_argument("--probe-lr", type=float, help="linear-probe SGD learning rate (0.01)")
    probe.add_argument("--probe-batch-size", type=int, help="linear-probe batch size (32)")
    tune = parser.add_argument_group("FT and CleanCLIP hyperparameters (see docs/baselines.md)")
    tune.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (10)")
    tune.add_argument("--ft-lr", type=float, help="AdamW learning rate (1e-5)")
    tune.add_argument("--ft-batch-size", type=int, help="fine-tuning batch size (32)")
    tune.add_argument("--ft-weight-decay", type=float, help="AdamW weight decay (0.1)")
    tune.add_argument("--ss-weight", type=float, help="CleanCLIP: weight of the in-modality self-supervised "
                      "losses (1)")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="required for bare checkpoints: OpenAI-derived weights need --quick-gelu")
    parser.add_argument("--arch", help="open_clip architecture name for checkpoints without a config")
    parser.add_argument("--pr-images", type=int, default=2000, help="test images used for PR (0 skips PR)")
    parser.add_argument("--test-limit", type=int, help="evaluate on a seeded random subset of this many test "
                        "images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hyperparameters = {name: getattr(args, name) for name in
                       ("alpha", "margin", "num_tokens", "start_block", "epochs", "lr", "batch_size",
                        "unlearn_weight", "unlearn_steps", "unlearn_mask_weight", "unlearn_refresh",
                        "unlearn_refresh_steps", "unlearn_refresh_stop", "unlearn_targets", "distill_weight",
                        "distill_temperature", "distill_mixup")}
    cbpt = {name: getattr(args, name) for name in
            ("num_context", "position", "positive", "rho", "inversion_steps", "inversion_lr", "trigger_weight",
             "adv_weight", "align_weight", "warmup_epochs")}
    cbpt.update(epochs=args.cbpt_epochs, lr=args.cbpt_lr, batch_size=args.cbpt_batch_size)
    probe = {"epochs": args.probe_epochs, "lr": args.probe_lr, "batch_size": args.probe_batch_size}
    ft = {"epochs": args.ft_epochs, "lr": args.ft_lr, "batch_size": args.ft_batch_size,
          "weight_decay": args.ft_weight_decay, "self_supervised_weight": args.ss_weight}
    try:
        result = purify(args.model, args.data, args.out, method=args.method, shots=args.shots,
                        templates=tuple(args.template or DEFAULT_TEMPLATES), attack=args.attack,
                        pr_images=args.pr_images, seed=args.seed, device=args.device,
                        progress=not args.no_progress, quick_gelu=args.quick_gelu, arch=args.arch,
                        cbpt=cbpt, schedule=args.schedule, probe=probe, ft=ft, test_limit=args.test_limit,
                        **hyperparameters)
    except ClipGuardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary({"before": result.before, f"after {args.method}": result.after}))
    print(f"wrote {result.out} in {result.seconds:.0f} s (training {result.train_seconds:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
