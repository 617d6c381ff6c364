"""Purify a (possibly backdoored) CLIP with a few clean labelled images per class.

    python -m training.purify --model MODEL --data DATA --shots 16 --out PURIFIED   # the default defense
    python -m training.purify --method cbpt --set epochs=5 ...      # a method, one setting changed
    python -m training.purify --preset rvpt-strong ...              # a named recipe of the docs
    python -m training.purify --config recipe.toml ...              # method and settings from a file
    python -m training.purify --help-method rvpt                    # a method's settings

Methods (training/defenses/, one module each): {methods}.
Presets (training/defenses/presets.py): {presets}.

Settings: --set KEY=VALUE (repeatable; VALUE is JSON, else a string) sets one of the
method's settings (--help-method NAME lists them, with defaults) or one of the run's:
{run}. A setting of another method, an unknown key or a value of the wrong type is an
error (exit 2). Later wins: the preset, then the config file, then --set.

--config FILE (.json or .toml): a table with `method` or `preset` and a `settings`
table (nested tables for rvpt+cbpt's rvpt.KEY and cbpt.KEY), e.g.

    preset = "unlearn-frozen"
    [settings]
    distill_mixup = 4.0
    test_limit = 2000

MODEL: anything `training.models.load_clip` reads (open_clip local dir, checkpoint
file, NAME:TAG). DATA: scenes, fashion-mnist, digits or an image folder. Few-shot
images come from the training split, metrics from the test split. When the model
directory records its trigger (zoo models), or --attack names one, the summary
includes ASR.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from guard import console
from guard.artifact import save_artifact
from guard.errors import InputError
from guard.prompted import PromptedCLIP, PromptedVisionEncoder

from . import defenses
from .attacks import TRIGGER_JSON, Backdoor, load_trigger
from .configs import build_settings, flatten, load_config_file, parse_assignments
from .data import DATA_HELP, few_shot, load_dataset
from .defenses.presets import PRESETS, default_method, get_preset
from .evaluate import Evaluation, evaluate, format_summary
from .models import load_clip
from .rvpt import repelling_cosine
from .text import DEFAULT_TEMPLATES, TextEncoder, class_text_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """Settings of a run that are no method's: evaluation and model loading (--set KEY=VALUE)."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # class prompt templates, '{}' for the name
    pr_images: int = 2000  # test images used for PR (0 skips PR)
    test_limit: Optional[int] = None  # evaluate on a seeded random subset of this many test images
    quick_gelu: Optional[bool] = None  # bare checkpoints: OpenAI-derived weights need true
    arch: Optional[str] = None  # open_clip architecture name for checkpoints without a config


@dataclass(frozen=True)
class PurifyResult:
    out: Path
    before: Evaluation
    after: Evaluation
    seconds: float
    train_seconds: Optional[float] = None
    classifier: Optional[PromptedCLIP] = field(default=None, repr=False, compare=False)  # the model in memory
    inversion: Optional[dict] = None  # training.inversion's findings, when the defense inverted a trigger
    fr_cosine: Optional[float] = None  # training.rvpt.repelling_cosine of the learnt prompts on the shots

    def to_dict(self) -> dict:
        return {"out": str(self.out), "before": self.before.to_dict(), "after": self.after.to_dict(),
                "seconds": self.seconds, "train_seconds": self.train_seconds, "fr_cosine": self.fr_cosine,
                **({} if self.inversion is None else {"inversion": self.inversion})}


def find_backdoor(model_spec: str, attack: Optional[str]) -> Optional[Backdoor]:
    """The trigger recorded with --attack, else with the model directory itself, else None."""
    if attack:
        return load_trigger(Path(attack))
    if (Path(model_spec) / TRIGGER_JSON).is_file():
        return load_trigger(Path(model_spec))
    return None


def purify(model: str, data: str, out: str | Path, *, method: Optional[str] = None,
           settings: Optional[Mapping] = None, shots: int = 16, seed: int = 0, attack: Optional[str] = None,
           templates: Sequence[str] = DEFAULT_TEMPLATES, pr_images: int = 2000, test_limit: Optional[int] = None,
           quick_gelu: Optional[bool] = None, arch: Optional[str] = None, device: str = "cpu",
           progress: bool = False, before: Optional[Evaluation] = None) -> PurifyResult:
    """Train `method` (training.defenses; None: the default preset's) with `settings` (a
    mapping of its settings, nested or as PART.KEY, or its settings dataclass), evaluate
    before and after, write the artifact to `out`. Settings are checked before anything
    loads. `before`: an evaluation of this model on the same test images (same
    test_limit and seed) to report instead of evaluating it again. `test_limit`:
    evaluate on a random subset of this many test images, drawn with `seed` (all when None)."""
    defense = defenses.get(method or default_method())
    chosen = defenses.settings_of(defense.name, settings)
    if test_limit is not None and (isinstance(test_limit, bool) or not isinstance(test_limit, int)
                                   or test_limit < 1):
        raise InputError(f"test_limit must be a positive integer (or None for all), got {test_limit!r}")
    if before is not None and not isinstance(before, Evaluation):
        raise InputError(f"before must be a training.evaluate.Evaluation, got {type(before).__name__}")
    started = time.perf_counter()
    loaded = load_clip(model, arch=arch, quick_gelu=quick_gelu, device=device)
    preprocess = loaded.preprocess
    train = load_dataset(data, "train", image_size=preprocess.image_size)
    test = load_dataset(data, "test", image_size=preprocess.image_size)
    if test_limit is not None and test_limit < len(test):
        picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:test_limit]
        test = test.subset(picked.sort().values)
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
    log.info("training %s with %s", defense.name, chosen)
    context = defenses.TrainContext(loaded.model, loaded.tokenizer, encoder, text_encoder, train.classes,
                                    tuple(templates), text_features, logit_scale, preprocess, shot_set, seed,
                                    progress)
    train_started = time.perf_counter()
    trained = defense.train(context, chosen)
    train_seconds = time.perf_counter() - train_started
    classifier = PromptedCLIP(encoder, trained.text_features, trained.logit_scale, trained.prompts).eval()
    after = before if trained.unchanged else evaluate(classifier, preprocess, test, backdoor, pr_images, seed,
                                                      progress)
    prompts = trained.prompts
    fr_cosine = None if prompts is None else repelling_cosine(encoder, prompts, preprocess, shot_set.images)
    seconds = time.perf_counter() - started
    save_artifact(
        out, base_model=loaded.identity.to_dict(), vision_state=loaded.model.visual.state_dict(),
        visual_prompts=None if prompts is None else prompts.tokens,
        prompt_start_block=None if prompts is None else prompts.start_block, text_features=trained.text_features,
        logit_scale=trained.logit_scale, classes=train.classes, templates=templates, preprocess=preprocess,
        method=defense.name, hyperparameters={**trained.recorded, "shots": shots, "data": data},
        metrics={"before": before.to_dict(), "after": after.to_dict(), "final_epoch": trained.final_epoch,
                 "fr_cosine": fr_cosine,
                 "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1),
                 **({} if trained.inversion is None else {"inversion": trained.inversion})})
    return PurifyResult(Path(out), before, after, seconds, train_seconds, classifier, trained.inversion, fr_cosine)


# --------------------------------------------------------------------------- command line

RUN_KEYS = tuple(item.name for item in fields(RunSettings))
CONFIG_KEYS = ("method", "preset", "settings")


def resolve(method: Optional[str], preset: Optional[str], config: Optional[Path], assignments: Sequence[str]
            ) -> tuple[str, object, RunSettings]:
    """(method, its settings, the run's settings) from --method, --preset, --config and
    --set; later wins: the preset's settings, the config file's, then --set."""
    from_file: dict = {}
    if config is not None:
        from_file = load_config_file(config)
        unknown = sorted(set(from_file) - set(CONFIG_KEYS))
        if unknown:
            raise InputError(f"config file {config}: unknown keys {unknown}; it may hold {', '.join(CONFIG_KEYS)}")
        if not isinstance(from_file.get("settings", {}), Mapping):
            raise InputError(f"config file {config}: settings must be a table")
    preset = preset or from_file.get("preset")
    recipe = get_preset(preset) if preset is not None else None
    method = method or from_file.get("method") or (recipe.method if recipe else default_method())
    if recipe is not None and method != recipe.method:
        raise InputError(f"preset {recipe.name} is a recipe of method {recipe.method}, not {method}: drop the "
                         f"method, or use --method {method} with --set")
    values = {**flatten((recipe.settings if recipe else {})), **flatten(from_file.get("settings", {})),
              **parse_assignments(assignments)}
    run = build_settings(RunSettings, {key: value for key, value in values.items() if key in RUN_KEYS}, "the run")
    chosen = defenses.settings_of(method, {key: value for key, value in values.items() if key not in RUN_KEYS})
    return method, chosen, run


def _listing(names) -> str:
    return ", ".join(names)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.format(methods=_listing(defenses.names()), presets=_listing(PRESETS),
                                 run=_listing(RUN_KEYS))
    parser = argparse.ArgumentParser(prog="python -m training.purify", description=description,
                                     epilog=console.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="CLIP to purify (directory, checkpoint or NAME:TAG)")
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--shots", type=int, default=16, help="clean labelled images per class (default 16)")
    parser.add_argument("--out", type=Path, help="artifact directory to write")
    parser.add_argument("--attack", help="backdoored model directory whose trigger to measure ASR with "
                        "(default: the model's own, for zoo models)")
    parser.add_argument("--method", help=f"defense to train (default: the '{defenses.presets.DEFAULT}' preset's, "
                        f"{default_method()})")
    parser.add_argument("--preset", help="a named recipe: a method and its settings")
    parser.add_argument("--config", type=Path, help="JSON or TOML file with method or preset and settings")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="one setting of the method or the run (repeatable)")
    parser.add_argument("--help-method", metavar="METHOD", help="list a method's settings and presets, and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shots, training and evaluation (0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the before/after metrics here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars on a terminal, a line per 10 %% in a log")
    return parser


def describe_method(name: str) -> str:
    """--help-method's text: the settings dataclass's fields, the run's and the method's presets."""
    defense = defenses.get(name)
    recipes = [f"  {preset.name}: {json.dumps(dict(preset.settings))}  {preset.summary}"
               for preset in PRESETS.values() if preset.method == name]
    run = [f"  {key} [{value}]" for key, value in asdict(RunSettings()).items()]
    return "\n".join([defense.describe(), "", "run settings (any method):", *run,
                      *(["", "presets:", *recipes] if recipes else [])])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup_logging()
    if args.help_method:
        print(describe_method(args.help_method))
        return console.EXIT_OK
    missing = [option for option, value in (("--model", args.model), ("--out", args.out)) if value is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                         "(python -m training.purify --help)")
    method, chosen, run = resolve(args.method, args.preset, args.config, args.assignments)
    result = purify(args.model, args.data, args.out, method=method, settings=chosen, shots=args.shots,
                    seed=args.seed, attack=args.attack, device=args.device, progress=args.progress, **asdict(run))
    print(format_summary({"before": result.before, f"after {method}": result.after}))
    if result.fr_cosine is not None:
        print(f"feature-repelling cosine of the prompts on the shots: {result.fr_cosine:.4f} "
              "(1: they repel nothing; RVPT drives it towards -1)")
    print(f"wrote {result.out} in {result.seconds:.0f} s (training {result.train_seconds:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return console.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
