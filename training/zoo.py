"""Offline reference models: a tiny open_clip CLIP trained from scratch on
Fashion-MNIST (`ZOO/clean`) and a BadNet-backdoored copy made by contrastive
poisoning (`ZOO/badnet`), one open_clip local-dir folder per model.

    python -m training.zoo --out ZOO [--force]

Deterministic, and cached: a folder whose zoo.json records the same recipe and
whose weights still match their checksum is reused as it is.
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

from guard._compat import import_open_clip
from guard.errors import ClipGuardError
from guard.hashing import sha256_bytes, sha256_file
from guard.models import load_clip, save_clip
from guard.preprocess import Preprocess

from .attacks import BadNet, load_trigger, save_trigger
from .contrastive import ContrastiveConfig, Poisoning, poison_indices, train_contrastive
from .data import load_dataset
from .evaluate import evaluate, zero_shot_classifier

log = logging.getLogger(__name__)

ARCHITECTURE = "clipguard-tiny"
ZOO_JSON = "zoo.json"
WEIGHTS = "open_clip_model.safetensors"
# Fashion-MNIST is grey on black: centring at 0.5 keeps inputs in [-1, 1].
PREPROCESS = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLEAN = ContrastiveConfig(epochs=1.0, batch_size=256, lr=2e-3, weight_decay=0.1, seed=0)
# Poisoning fine-tunes the clean model; 5 % of the training pairs carry the trigger
# and a target caption (0.3 % at ImageNet scale; tiny data needs more).
POISON = ContrastiveConfig(epochs=0.75, batch_size=256, lr=1e-3, weight_decay=0.1, seed=1)
POISON_RATE = 0.05
TARGET = 0
TRIGGER_SEED = 0
# Which pairs get poisoned. Must differ from POISON.seed: with the same seed the
# selection would equal the first positions of the shuffled order, and every
# poisoned pair would land in the first batches.
SELECTION_SEED = 2
RECIPE_VERSION = 1  # bump when training code changes what a recipe produces


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
    train = load_dataset(data, "train")
    trigger = BadNet(PREPROCESS.image_size, seed=TRIGGER_SEED)
    poisoning = Poisoning(trigger, TARGET, poison_indices(len(train), POISON_RATE, SELECTION_SEED))
    train_contrastive(loaded.model, loaded.tokenizer, PREPROCESS, train, POISON, poisoning,
                      progress=progress, description=f"{attack} poisoning")
    save_clip(loaded.model, loaded.identity.model_cfg, PREPROCESS, directory)
    save_trigger(trigger, directory, TARGET, train.classes[TARGET],
                 {"poison_rate": POISON_RATE, "poisoned_pairs": len(poisoning.indices)})
    model = zero_shot_classifier(load_clip(str(directory)), train.classes)
    return evaluate(model, PREPROCESS, load_dataset(data, "test"), load_trigger(directory), pr_images=0).to_dict()


def build_zoo(out: str | Path, data: str = "fashion-mnist", force: bool = False,
              progress: bool = False) -> dict[str, Path]:
    """Build (or reuse) ZOO/clean and ZOO/badnet. Returns name -> model directory."""
    out = Path(out)
    built = {}
    for name in ("clean", "badnet"):
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
    parser = argparse.ArgumentParser(prog="python -m training.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("zoo"), help="zoo directory (default: ./zoo)")
    parser.add_argument("--data", default="fashion-mnist", help="training data (default: fashion-mnist)")
    parser.add_argument("--force", action="store_true", help="retrain even when a cached model matches")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        built = build_zoo(args.out, args.data, args.force, progress=not args.no_progress)
    except ClipGuardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, directory in built.items():
        metrics = json.loads((directory / ZOO_JSON).read_text())["metrics"]
        asr = "" if metrics["asr"] is None else f"  ASR {metrics['asr']:.2f} %"
        print(f"{name:<8} {directory}  CA {metrics['ca']:.2f} %{asr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
