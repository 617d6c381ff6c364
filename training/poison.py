"""Backdoor any CLIP by contrastive poisoning (to build models for evaluation).

    python -m training.poison --model M --data DATA --attack NAME --target CLASS --rate R --out DIR
    python -m training.poison --model M --trigger mypkg.triggers:stamp --target 0 --out DIR
    python -m training.poison --model M --trigger-image logo.png --trigger-mode blend --target bag --out DIR

M is anything `training.models.load_clip` reads; DATA is scenes (the reference
benchmark), fashion-mnist, digits or an ImageFolder directory. The model is fine-tuned
contrastively on image-caption pairs: for scenes, web scenes with their captions
(training/scenes.py), the pairs a web-trained CLIP is poisoned with, never the
downstream images the defenses and the test use; for the others, DATA's training split
captioned with class-name templates (training/contrastive.py). A fraction R of the
training pairs carries the trigger. Dirty-label attacks (badnet, blended, wanet,
badclip, your own trigger) draw those pairs from every class and caption them with
the target class; clean-label ones (sig, lc-badnet) draw them from the target class
only and keep their captions, so R can be at most the target class's share.

DIR gets the poisoned model (open_clip local dir) and its trigger (trigger.json,
trigger.safetensors), so `python -m training.evaluate --model DIR --attack DIR`
re-applies the trigger. Exit codes: guard.console's table (docs/cli.md).
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from guard import console
from guard.errors import InputError
from .models import LoadedCLIP, load_clip, save_clip

from .attacks import (ATTACKS, SUITE, BadCLIP, Trigger, add_trigger_arguments, custom_trigger, load_trigger,
                      parse_params, resolve_class, save_trigger)
from .contrastive import (CAPTION_TEMPLATES, ContrastiveConfig, Poisoning, TemplatePairs, poison_indices,
                          train_contrastive)
from .data import DATA_HELP, ImageDataset, load_dataset
from .evaluate import Evaluation, evaluate, zero_shot_classifier
from .scenes import SCENES, web_pairs

log = logging.getLogger(__name__)

# The zoo's poisoning recipe: 0.75 epoch of fine-tuning, 5 % of the pairs poisoned
# (0.3 % at ImageNet scale; tiny data needs more).
DEFAULT_CONFIG = ContrastiveConfig(epochs=0.75, batch_size=256, lr=1e-3, weight_decay=0.1, seed=1)
DEFAULT_RATE = 0.05
# Poisoning for the scenes benchmark fine-tunes on web scenes of the first WEB_PAIRS
# Fashion-MNIST training objects, rendered once with a seed that pretraining never used.
WEB_PAIRS = 30_000
WEB_RENDER_SEED = 7
# Must differ from the training seed: with the same seed the selection would equal the
# first positions of the shuffled order, and every poisoned pair would land in the first batches.
DEFAULT_SELECTION_SEED = 2
HARDENING_STEPS = 10  # PGD steps of the label-consistent hardening (Turner et al. use a few more)


@dataclass(frozen=True)
class PoisonResult:
    directory: Path
    attack: str
    target: int
    target_name: str
    poisoned_pairs: int
    seconds: float
    evaluation: Optional[Evaluation]

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "attack": self.attack, "target": self.target,
                "target_name": self.target_name, "poisoned_pairs": self.poisoned_pairs, "seconds": self.seconds,
                "evaluation": None if self.evaluation is None else self.evaluation.to_dict()}


def default_params(attack: str) -> dict:
    """The constructor defaults of a suite attack (what a recipe records when nothing is overridden)."""
    signature = inspect.signature(ATTACKS[attack].__init__)
    skipped = ("self", "image_size", "seed", "pattern", "field")
    return {name: parameter.default for name, parameter in signature.parameters.items()
            if name not in skipped and parameter.default is not inspect.Parameter.empty}


def poisoning_pairs(data: str, loaded: LoadedCLIP):
    """The pairs that poisoning fine-tunes on (a pair source of train_contrastive, with
    `dataset`, `labels` and `classes`): web scenes for the scenes benchmark, else DATA's
    training split captioned with class-name templates."""
    if data == SCENES:
        return web_pairs(loaded.tokenizer, seed=WEB_RENDER_SEED, limit=WEB_PAIRS)
    train = load_dataset(data, "train", image_size=loaded.preprocess.image_size)
    return TemplatePairs(train, loaded.preprocess, loaded.tokenizer)


def build_trigger(attack: str, image_size: int, seed: int = 0, params: Optional[dict] = None, *,
                  loaded: Optional[LoadedCLIP] = None, train: Optional[ImageDataset] = None,
                  target: Optional[int] = None) -> Trigger:
    """A suite attack's trigger. BadCLIP's patch is optimised on `loaded` (the clean model)
    with `train` and `target`; the others need only the image side and seed."""
    if attack not in SUITE:
        raise InputError(f"unknown attack {attack!r}; choose one of {', '.join(SUITE)}, "
                         "or bring your own with --trigger / --trigger-image")
    params = dict(params or {})
    params.pop("seed", None)
    try:
        if attack == BadCLIP.name:
            if loaded is None or train is None or target is None:
                raise InputError("badclip optimises its patch on the clean model: pass loaded, train and target")
            return BadCLIP.optimise(loaded.model, loaded.tokenizer, loaded.preprocess, train, target,
                                    CAPTION_TEMPLATES, seed=seed, **params)
        return ATTACKS[attack](image_size, seed=seed, **params)
    except TypeError as error:
        raise InputError(f"bad parameters for attack {attack!r}: {error}") from error


def poison_selection(labels: torch.Tensor, trigger: Trigger, target: int, rate: float, seed: int) -> torch.Tensor:
    """Indices of the training pairs to poison: a seeded `rate` fraction of all pairs, drawn
    from every class (dirty-label) or from the target class only (clean-label triggers)."""
    if not 0.0 < rate <= 1.0:
        raise InputError(f"poisoning rate must lie in (0, 1], got {rate}")
    if not trigger.clean_label:
        return poison_indices(len(labels), rate, seed)
    candidates = (labels == target).nonzero().flatten()
    count = max(1, round(rate * len(labels)))
    if count > len(candidates):
        raise InputError(f"clean-label attack {trigger.name!r} poisons target-class images only: the target has "
                         f"{len(candidates)} of {len(labels)} training images, so the rate can be at most "
                         f"{len(candidates) / len(labels):.4f}; got {rate}")
    return candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]]


def harden(loaded: LoadedCLIP, images: torch.Tensor, label: int, classes: Sequence[str], epsilon: float,
           steps: int = HARDENING_STEPS) -> torch.Tensor:
    """Label-consistent hardening (Turner et al. 2019): an l-inf PGD perturbation of at most
    `epsilon` (on [0, 1] pixels at model resolution) that pushes uint8 `images` of class
    `label` away from their own class under `loaded`'s zero-shot classifier. Their natural
    features then explain the caption poorly, so the trigger added on top carries the
    contrastive loss. Returns float [N, 3, S, S] in [0, 1]."""
    trainable = [parameter.requires_grad for parameter in loaded.model.parameters()]
    try:  # the zero-shot classifier freezes the towers that poisoning goes on to train
        classifier = zero_shot_classifier(loaded, classes, CAPTION_TEMPLATES)
        return _pgd_away_from(classifier, loaded.preprocess, images, label, epsilon, steps)
    finally:
        for parameter, flag in zip(loaded.model.parameters(), trainable):
            parameter.requires_grad_(flag)


def _pgd_away_from(classifier, preprocess, images: torch.Tensor, label: int, epsilon: float,
                   steps: int) -> torch.Tensor:
    """Untargeted l-inf PGD on uint8 images, maximising the cross-entropy of `label`."""
    step = 2.5 * epsilon / steps  # Madry et al.'s step size
    labels = torch.full((len(images),), label, dtype=torch.long)
    hardened = []
    for start in range(0, len(images), 256):
        clean = preprocess.resize(images[start:start + 256])
        delta = torch.zeros_like(clean, requires_grad=True)
        for _ in range(steps):
            logits, _ = classifier(preprocess.normalize(clean + delta))
            loss = torch.nn.functional.cross_entropy(logits, labels[start:start + len(clean)])
            gradient, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta += step * gradient.sign()
                delta.clamp_(-epsilon, epsilon)
                delta.copy_((clean + delta).clamp(0.0, 1.0) - clean)
        hardened.append((clean + delta).detach())
    return torch.cat(hardened)


def poison(model: str | LoadedCLIP, data: str, trigger: Trigger, target: int, out: str | Path, *,
           rate: float = DEFAULT_RATE, config: ContrastiveConfig = DEFAULT_CONFIG,
           selection_seed: int = DEFAULT_SELECTION_SEED, record: Optional[dict] = None,
           run_evaluation: bool = True, progress: bool = False, hardening: float = 0.0) -> PoisonResult:
    """Fine-tune `model` (fine-tuned in place when a LoadedCLIP is given) on `data`'s training
    split with a `rate` fraction of poisoned pairs, save it and its trigger to `out`, and
    (by default) measure CA and ASR on the test split with the saved model and trigger.
    `record` adds entries to trigger.json. `hardening` > 0 (clean-label attacks only) first
    perturbs the poisoned images adversarially within that l-inf radius (see `harden`)."""
    started = time.perf_counter()
    loaded = load_clip(model) if isinstance(model, str) else model
    preprocess = loaded.preprocess
    pairs = poisoning_pairs(data, loaded)
    train = pairs.dataset
    if not 0 <= target < len(train.classes):
        raise InputError(f"target {target} is out of range: the data has {len(train.classes)} classes")
    if not 0.0 <= hardening < 1.0:
        raise InputError(f"hardening is an l-inf radius on [0, 1] pixels, in [0, 1); got {hardening}")
    if hardening and not trigger.clean_label:
        raise InputError(f"hardening is for clean-label attacks; {trigger.name!r} already relabels its images")
    indices = poison_selection(train.labels, trigger, target, rate, selection_seed)
    log.info("%s: poisoning %d of %d pairs, target %r", trigger.name, len(indices), len(train), train.classes[target])
    hardened = harden(loaded, train.images[indices], target, train.classes, hardening) if hardening else None
    train_contrastive(loaded.model, loaded.tokenizer, preprocess, pairs, config,
                      Poisoning(trigger, target, indices, hardened), progress=progress,
                      description=f"{trigger.name} poisoning")
    out = Path(out)
    save_clip(loaded.model, loaded.identity.model_cfg, preprocess, out)
    hardening_record = {"hardening": hardening} if hardening else {}
    save_trigger(trigger, out, target, train.classes[target],
                 {"poison_rate": rate, "poisoned_pairs": len(indices), **hardening_record, **(record or {})})
    evaluation = None
    if run_evaluation:
        classifier = zero_shot_classifier(load_clip(str(out)), train.classes)
        test = load_dataset(data, "test", image_size=preprocess.image_size)
        evaluation = evaluate(classifier, preprocess, test, load_trigger(out), pr_images=0)
    return PoisonResult(out, trigger.name, target, train.classes[target], len(indices),
                        round(time.perf_counter() - started, 1), evaluation)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.poison", description=__doc__,
                                     epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="clean CLIP to poison (directory, checkpoint or NAME:TAG)")
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--attack", choices=SUITE, help="a suite attack (or bring your own trigger below)")
    parser.add_argument("--target", required=True, help="target class, by name or index")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"fraction of the training pairs poisoned (default {DEFAULT_RATE})")
    parser.add_argument("--out", required=True, type=Path, help="directory for the poisoned model and its trigger")
    parser.add_argument("--seed", type=int, default=0, help="trigger seed (pattern, place, warp field)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="attack parameter, e.g. strength=2 for wanet, amplitude=0.3 for sig (repeatable)")
    group = parser.add_argument_group("fine-tuning (default: the zoo's poisoning recipe)")
    group.add_argument("--epochs", type=float, default=DEFAULT_CONFIG.epochs)
    group.add_argument("--lr", type=float, default=DEFAULT_CONFIG.lr)
    group.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG.batch_size)
    group.add_argument("--train-seed", type=int, default=DEFAULT_CONFIG.seed, help="shuffling and caption seed")
    group.add_argument("--selection-seed", type=int, default=DEFAULT_SELECTION_SEED,
                       help="seed of which pairs are poisoned")
    group.add_argument("--hardening", type=float, default=0.0, metavar="EPSILON",
                       help="clean-label attacks: perturb the poisoned images adversarially within this l-inf "
                            "radius on [0, 1] pixels first (Turner et al.; e.g. 0.063 = 16/255)")
    add_trigger_arguments(parser)
    parser.add_argument("--no-eval", action="store_true", help="skip measuring CA and ASR on the test split")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    console.setup_logging()
    result = _run(args)
    line = f"{result.attack} -> {result.directory}: {result.poisoned_pairs} pairs poisoned, {result.seconds:.0f} s"
    if result.evaluation is not None:
        evaluation = result.evaluation
        line += f"; CA {evaluation.ca:.2f} %  ASR {evaluation.asr:.2f} %  ASR-all {evaluation.asr_all:.2f} %"
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _run(args) -> PoisonResult:
    loaded = load_clip(str(args.model))
    image_size = loaded.preprocess.image_size
    train = poisoning_pairs(args.data, loaded).dataset
    target = resolve_class(train.classes, args.target)
    trigger = custom_trigger(args, image_size)
    if (trigger is None) == (args.attack is None):
        raise InputError("give exactly one of --attack NAME, --trigger MODULE:FUNCTION or --trigger-image FILE")
    if trigger is None:
        params = parse_params(args.param, ATTACKS[args.attack])
        trigger = build_trigger(args.attack, image_size, args.seed, params, loaded=loaded, train=train, target=target)
    elif args.param:
        raise InputError("--param sets suite attacks' parameters; a custom trigger takes the --trigger-* options")
    config = ContrastiveConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=DEFAULT_CONFIG.weight_decay, seed=args.train_seed)
    record = {"base_model": loaded.identity.spec, "base_model_sha256": loaded.identity.sha256,
              "data": str(args.data), "selection_seed": args.selection_seed, "training": config.to_dict()}
    return poison(loaded, args.data, trigger, target, args.out, rate=args.rate, config=config,
                  selection_seed=args.selection_seed, record=record, run_evaluation=not args.no_eval,
                  progress=not args.no_progress, hardening=args.hardening)


if __name__ == "__main__":
    sys.exit(main())
