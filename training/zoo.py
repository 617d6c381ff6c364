"""Offline reference models: a tiny open_clip CLIP trained from scratch on
Fashion-MNIST (`ZOO/clean`) and backdoored copies made from it by contrastive
poisoning (training/poison.py), one open_clip local-dir folder per model, named
after the attack (`ZOO/badnet`, `ZOO/blended`, `ZOO/wanet`, `ZOO/sig`,
`ZOO/lc-badnet`, `ZOO/badclip`).

    python -m training.zoo --out ZOO [--attacks badnet,sig,...|all] [--force]

--attacks defaults to the whole suite; `build_zoo` (used by `python -m training`)
defaults to badnet only. Deterministic, and cached: a folder whose zoo.json records
the same recipe and whose weights still match their checksum is reused as it is.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch

from guard import console
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.hashing import sha256_bytes, sha256_file
from .models import load_clip, save_clip
from guard.preprocess import Preprocess

from .attacks import SUITE
from .contrastive import ContrastiveConfig, train_contrastive
from .data import load_dataset
from .evaluate import evaluate, zero_shot_classifier
from .poison import DEFAULT_CONFIG, DEFAULT_RATE, DEFAULT_SELECTION_SEED, build_trigger, default_params, poison

log = logging.getLogger(__name__)

ARCHITECTURE = "clipguard-tiny"
ZOO_JSON = "zoo.json"
WEIGHTS = "open_clip_model.safetensors"
# Fashion-MNIST is grey on black: centring at 0.5 keeps inputs in [-1, 1].
PREPROCESS = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLEAN = ContrastiveConfig(epochs=1.0, batch_size=256, lr=2e-3, weight_decay=0.1, seed=0)
# Poisoning fine-tunes the clean model (training/poison.py's defaults: 0.75 epoch,
# 5 % of the training pairs poisoned, selection seed 2).
POISON = DEFAULT_CONFIG
POISON_RATE = DEFAULT_RATE
TARGET = 0
TRIGGER_SEED = 0
SELECTION_SEED = DEFAULT_SELECTION_SEED
RECIPE_VERSION = 1  # bump when training code changes what a recipe produces
# Settings of the suite's models beyond the shared ones above: "params" override the
# attack's own defaults, "rate" the poisoning rate. BadNet's recipe predates the
# suite and stays exactly as it was (its folder must not be rebuilt).
SUITE_VERSION = 1  # bump when attack code changes what a suite recipe produces
ZOO_ATTACKS: dict[str, dict] = {name: {} for name in SUITE}


def reference_model_cfg() -> dict:
    """The open_clip model config of the tiny reference CLIP."""
    text = resources.files("training").joinpath("model_configs", f"{ARCHITECTURE}.json").read_text()
    return json.loads(text)


def _recipe(name: str, data: str) -> dict:
    recipe = {"version": RECIPE_VERSION, "architecture": reference_model_cfg(), "data": data,
              "preprocess": PREPROCESS.to_dict(), "clean": CLEAN.to_dict()}
    if name != "clean":
        recipe.update(attack=name, poison=POISON.to_dict(), rate=POISON_RATE, target=TARGET,
                      trigger_seed=TRIGGER_SEED, selection_seed=SELECTION_SEED)
    if name not in ("clean", "badnet"):
        settings = ZOO_ATTACKS[name]
        recipe.update(rate=settings.get("rate", POISON_RATE), suite_version=SUITE_VERSION,
                      trigger_params={**default_params(name), **settings.get("params", {})})
    return recipe


def _cached(directory: Path, recipe_sha256: str) -> bool:
    record_path = directory / ZOO_JSON
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    return (record.get("recipe_sha256") == recipe_sha256
            and (directory / WEIGHTS).is_file()
            and sha256_file(directory / WEIGHTS) == record.get("weights_sha256"))


def _write_record(directory: Path, recipe: dict, recipe_sha256: str, metrics: dict, seconds: float) -> None:
    record = {"recipe_sha256": recipe_sha256, "weights_sha256": sha256_file(directory / WEIGHTS),
              "seconds": round(seconds, 1), "metrics": metrics, "recipe": recipe}
    (directory / ZOO_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _train_clean(directory: Path, data: str, progress: bool) -> dict:
    oc = import_open_clip()
    torch.manual_seed(CLEAN.seed)
    cfg = reference_model_cfg()
    model = oc.model.CLIP(**cfg)
    tokenizer = oc.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    train = load_dataset(data, "train")
    train_contrastive(model, tokenizer, PREPROCESS, train, CLEAN, progress=progress, description="clean CLIP")
    save_clip(model, cfg, PREPROCESS, directory)
    loaded = load_clip(str(directory))
    return evaluate(zero_shot_classifier(loaded, train.classes), PREPROCESS, load_dataset(data, "test"),
                    pr_images=0).to_dict()


def _train_backdoored(directory: Path, clean_dir: Path, attack: str, data: str, progress: bool) -> dict:
    loaded = load_clip(str(clean_dir))
    settings = ZOO_ATTACKS[attack]
    train = load_dataset(data, "train")
    trigger = build_trigger(attack, PREPROCESS.image_size, TRIGGER_SEED, settings.get("params"),
                            loaded=loaded, train=train, target=TARGET)
    result = poison(loaded, data, trigger, TARGET, directory, rate=settings.get("rate", POISON_RATE),
                    config=POISON, selection_seed=SELECTION_SEED, progress=progress)
    return result.evaluation.to_dict()


def build_zoo(out: str | Path, data: str = "fashion-mnist", force: bool = False,
              progress: bool = False, attacks: Sequence[str] = ("badnet",)) -> dict[str, Path]:
    """Build (or reuse) ZOO/clean and ZOO/<attack> for each of `attacks` (names in
    training.attacks.SUITE). Returns name -> model directory."""
    unknown = [name for name in attacks if name not in ZOO_ATTACKS]
    if unknown:
        raise InputError(f"unknown attack(s) {unknown}; the zoo builds {', '.join(SUITE)}")
    out = Path(out)
    built = {}
    for name in ("clean", *dict.fromkeys(attacks)):
        directory = out / name
        recipe = _recipe(name, data)
        recipe_sha256 = sha256_bytes(json.dumps(recipe, sort_keys=True).encode())
        if not force and _cached(directory, recipe_sha256):
            log.info("%s: cached in %s", name, directory)
        else:
            started = time.perf_counter()
            directory.mkdir(parents=True, exist_ok=True)
            if name == "clean":
                metrics = _train_clean(directory, data, progress)
            else:
                metrics = _train_backdoored(directory, out / "clean", name, data, progress)
            _write_record(directory, recipe, recipe_sha256, metrics, time.perf_counter() - started)
            log.info("%s: built in %.0f s: %s", name, time.perf_counter() - started, metrics)
        built[name] = directory
    return built


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.zoo", description=__doc__,
                                     epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("zoo"), help="zoo directory (default: ./zoo)")
    parser.add_argument("--data", default="fashion-mnist", help="training data (default: fashion-mnist)")
    parser.add_argument("--attacks", default="all",
                        help=f"comma-separated backdoored models to build, or all (default): {','.join(SUITE)}")
    parser.add_argument("--force", action="store_true", help="retrain even when a cached model matches")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    console.setup_logging()
    attacks = SUITE if args.attacks == "all" else [name.strip() for name in args.attacks.split(",") if name.strip()]
    built = build_zoo(args.out, args.data, args.force, progress=not args.no_progress, attacks=attacks)
    for name, directory in built.items():
        metrics = json.loads((directory / ZOO_JSON).read_text())["metrics"]
        asr = "" if metrics["asr"] is None else f"  ASR {metrics['asr']:.2f} %"
        asr += "" if metrics["asr_all"] is None else f"  ASR-all {metrics['asr_all']:.2f} %"
        print(f"{name:<10} {directory}  CA {metrics['ca']:.2f} %{asr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
