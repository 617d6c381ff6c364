"""Purify a (possibly backdoored) CLIP with a few clean labelled images per class.

    python -m training.purify --method rvpt --model MODEL --data DATA --shots 16 --out PURIFIED

Methods: rvpt (visual prompts, training/rvpt.py), cbpt (class-wise text contexts,
training/cbpt.py; the artifact has no visual prompts, only the purified class
embeddings) and rvpt+cbpt (both: --schedule joint, the default, trains both at
once; sequential trains RVPT, then CBPT on the prompted image tower; see
docs/cbpt.md). The RVPT options below set RVPT only; CBPT has its own
(--cbpt-epochs, --cbpt-lr, ...).

MODEL: anything `guard.models.load_clip` reads (open_clip local dir, checkpoint
file, NAME:TAG). DATA: fashion-mnist, digits or an ImageFolder directory. Few-shot
images come from the training split, metrics from the test split. When the model
directory records its trigger (zoo models), or --attack names one, the summary
includes ASR. Exit codes: 0 done, 2 bad input or model.
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
from guard.models import load_clip
from guard.prompted import PromptedCLIP, PromptedVisionEncoder
from guard.text import DEFAULT_TEMPLATES, TextEncoder, class_text_features

from .attacks import TRIGGER_JSON, Backdoor, load_trigger
from .cbpt import CBPTConfig, POSITIVE_CHOICES, purified_text_features, train_cbpt, train_joint
from .data import few_shot, load_dataset
from .evaluate import Evaluation, evaluate, format_summary
from .rvpt import RVPTConfig, train_rvpt

log = logging.getLogger(__name__)

METHODS = ("rvpt", "cbpt", "rvpt+cbpt")
SCHEDULES = ("joint", "sequential")


@dataclass(frozen=True)
class PurifyResult:
    out: Path
    before: Evaluation
    after: Evaluation
    seconds: float
    train_seconds: Optional[float] = None
    classifier: Optional[PromptedCLIP] = field(default=None, repr=False, compare=False)  # the model in memory

    def to_dict(self) -> dict:
        return {"out": str(self.out), "before": self.before.to_dict(), "after": self.after.to_dict(),
                "seconds": self.seconds, "train_seconds": self.train_seconds}


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
           schedule: str = "joint", **hyperparameters) -> PurifyResult:
    """Learn the method's prompts, evaluate before and after, write the artifact to `out`.
    `hyperparameters` override RVPT's defaults (see RVPTConfig), `cbpt` CBPT's (see
    CBPTConfig); `schedule` ("sequential" or "joint") only matters for rvpt+cbpt."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
    uses_rvpt, uses_cbpt = method in ("rvpt", "rvpt+cbpt"), method in ("cbpt", "rvpt+cbpt")
    stray_rvpt = sorted(name for name, value in hyperparameters.items() if value is not None)
    if stray_rvpt and not uses_rvpt:
        raise InputError(f"{stray_rvpt} are RVPT settings and method {method!r} has no RVPT stage; "
                         "set CBPT's with cbpt={...} (--cbpt-epochs, --cbpt-lr, ... on the command line)")
    if not uses_cbpt and any(value is not None for value in (cbpt or {}).values()):
        raise InputError(f"CBPT settings were given but method {method!r} has no CBPT stage; use --method cbpt "
                         "or rvpt+cbpt")
    cbpt_config = CBPTConfig.with_overrides(**{"seed": seed, **(cbpt or {})}) if uses_cbpt else None
    started = time.perf_counter()
    loaded = load_clip(model, arch=arch, quick_gelu=quick_gelu, device=device)
    preprocess = loaded.preprocess
    train = load_dataset(data, "train", image_size=preprocess.image_size)
    test = load_dataset(data, "test", image_size=preprocess.image_size)
    shot_set = few_shot(train, shots, seed)
    backdoor = find_backdoor(model, attack)
    encoder = PromptedVisionEncoder(loaded.model.visual)
    text_encoder = TextEncoder(loaded.model)
    text_features = class_text_features(text_encoder, loaded.tokenizer, train.classes, templates)
    logit_scale = loaded.model.logit_scale.exp().item()
    log.info("evaluating the model before purification")
    before = evaluate(PromptedCLIP(encoder, text_features, logit_scale), preprocess, test, backdoor,
                      pr_images, seed, progress)
    rvpt_config = RVPTConfig.for_encoder(encoder, seed=seed, **hyperparameters) if uses_rvpt else None
    log.info("training %s with %s", method, {"rvpt": rvpt_config, "cbpt": cbpt_config, "schedule": schedule})
    train_started = time.perf_counter()
    prompts = None
    if method == "rvpt":
        prompts, history = train_rvpt(encoder, text_features, logit_scale, preprocess, shot_set, rvpt_config,
                                      progress)
        final_epoch = history[-1]
        recorded = rvpt_config.to_dict()
    else:
        text_args = (encoder, text_encoder, loaded.tokenizer, train.classes, logit_scale, preprocess, shot_set,
                     cbpt_config)
        if method == "cbpt":
            context, history = train_cbpt(*text_args, progress=progress)
            final_epoch, recorded = history[-1], {"cbpt": cbpt_config.to_dict()}
        elif schedule == "sequential":  # RVPT against the template embeddings, then CBPT on its prompted tower
            prompts, rvpt_history = train_rvpt(encoder, text_features, logit_scale, preprocess, shot_set,
                                               rvpt_config, progress)
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
    after = evaluate(classifier, preprocess, test, backdoor, pr_images, seed, progress)
    seconds = time.perf_counter() - started
    save_artifact(
        out, base_model=loaded.identity.to_dict(), vision_state=loaded.model.visual.state_dict(),
        visual_prompts=None if prompts is None else prompts.tokens,
        prompt_start_block=None if prompts is None else prompts.start_block, text_features=text_features,
        logit_scale=logit_scale, classes=train.classes, templates=templates, preprocess=preprocess,
        method=method, hyperparameters={**recorded, "shots": shots, "data": data},
        metrics={"before": before.to_dict(), "after": after.to_dict(), "final_epoch": final_epoch,
                 "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1)})
    return PurifyResult(Path(out), before, after, seconds, train_seconds, classifier)


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
    group.add_argument("--alpha", type=float, help="weight of the feature-repelling loss (2; 0 = plain VPT)")
    group.add_argument("--margin", type=float, help="FR margin m in max(cos, m) (-1 = full repulsion)")
    group.add_argument("--prompt-tokens", dest="num_tokens", type=int, help="prompt tokens per block")
    group.add_argument("--prompt-start", dest="start_block", type=int, help="first prompted block (J)")
    group.add_argument("--epochs", type=int, help="RVPT training epochs (50)")
    group.add_argument("--lr", type=float, help="RVPT SGD learning rate (0.002)")
    group.add_argument("--batch-size", type=int, help="RVPT batch size (32)")
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
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="required for bare checkpoints: OpenAI-derived weights need --quick-gelu")
    parser.add_argument("--arch", help="open_clip architecture name for checkpoints without a config")
    parser.add_argument("--pr-images", type=int, default=2000, help="test images used for PR (0 skips PR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hyperparameters = {name: getattr(args, name) for name in
                       ("alpha", "margin", "num_tokens", "start_block", "epochs", "lr", "batch_size")}
    cbpt = {name: getattr(args, name) for name in
            ("num_context", "position", "positive", "rho", "inversion_steps", "inversion_lr", "trigger_weight",
             "adv_weight", "align_weight", "warmup_epochs")}
    cbpt.update(epochs=args.cbpt_epochs, lr=args.cbpt_lr, batch_size=args.cbpt_batch_size)
    try:
        result = purify(args.model, args.data, args.out, method=args.method, shots=args.shots,
                        templates=tuple(args.template or DEFAULT_TEMPLATES), attack=args.attack,
                        pr_images=args.pr_images, seed=args.seed, device=args.device,
                        progress=not args.no_progress, quick_gelu=args.quick_gelu, arch=args.arch,
                        cbpt=cbpt, schedule=args.schedule, **hyperparameters)
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
