"""Offline reference models: a clean CLIP (`ZOO/clean`) and backdoored copies made from
it by contrastive poisoning (training/poison.py), one open_clip local-dir folder per
model, named after the attack (`ZOO/badnet`, `ZOO/blended`, `ZOO/wanet`, `ZOO/sig`,
`ZOO/lc-badnet`, `ZOO/badclip`).

    python -m training.zoo --out ZOO [--attacks badnet,sig,...|all] [--force]
    python -m training.zoo --out ZOO --data scenes --pretrained DIR     # the scenes benchmark
    python -m training.zoo --out ZOO --data scenes --pretrain           # ... pretraining it first

Two benchmarks. On fashion-mnist (or digits) the clean model is a
tiny CLIP trained here from scratch on DATA, and poisoning fine-tunes it on DATA's
captioned training split. On scenes the clean model is a CLIP pretrained on the web
corpus (`python -m training.pretrain`, about an hour on 2 cores), copied from DIR, and
poisoning fine-tunes it on web pairs, the papers' way: at a fifth of pretraining's peak
learning rate, BadNet at a random place per image. Each model's zoo.json records the
`downstream` data the defenses are measured on. The command line prints the clean
model's gates (training/gates.py) with every built attack's floor, and writes them to
ZOO/gates.json.

--attacks defaults to the whole suite; `build_zoo` (used by `python -m training`)
defaults to badnet only. Deterministic, and cached: a folder whose zoo.json records
the same recipe and whose weights still match their checksum is reused as it is.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from guard import console
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.hashing import sha256_bytes, sha256_file
from .models import load_clip, save_clip
from guard.preprocess import Preprocess

from .attacks import SUITE, load_trigger
from .contrastive import ContrastiveConfig, train_contrastive
from .data import load_dataset
from .evaluate import evaluate, trigger_floor, zero_shot_classifier
from .gates import GateFigures, format_gates, measure_gates
from .poison import (DEFAULT_CONFIG, DEFAULT_RATE, DEFAULT_SELECTION_SEED, build_trigger, default_params,
                     poison, poisoning_pairs)
from .pretrain import PRETRAIN_JSON, RECIPE as PRETRAIN_RECIPE, pretrain, scenes_model_cfg
from .scenes import SCENES, caption_words

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
GATES_JSON = "gates.json"

# The scenes benchmark poisons a pretrained CLIP as the papers do: fine-tuning at a fifth
# of pretraining's peak learning rate (the papers: 1/50), BadNet at a random place per image.
SCENES_POISON = ContrastiveConfig(epochs=1.0, batch_size=256, lr=PRETRAIN_RECIPE.lr / 5, weight_decay=0.1, seed=1)
SCENES_RATE = 0.05  # the cap; the smallest rate that launches is measured per model (docs/scenes-benchmark.md)
SCENES_ATTACKS: dict[str, dict] = {name: {} for name in SUITE}
SCENES_ATTACKS["badnet"] = {"params": {"position": "per-image"}}


def reference_model_cfg() -> dict:
    """The open_clip model config of the tiny reference CLIP."""
    text = resources.files("training").joinpath("model_configs", f"{ARCHITECTURE}.json").read_text()
    return json.loads(text)


def _poisoning(data: str) -> tuple[ContrastiveConfig, float, dict[str, dict]]:
    """The benchmark's poisoning: training config, rate and each attack's settings."""
    return (SCENES_POISON, SCENES_RATE, SCENES_ATTACKS) if data == SCENES else (POISON, POISON_RATE, ZOO_ATTACKS)


def _recipe(name: str, data: str, pretrained_sha256: Optional[str] = None) -> dict:
    if data == SCENES:  # the clean model is the pretrained one: its checksum is its recipe
        recipe = {"version": RECIPE_VERSION, "data": data, "pretrained_sha256": pretrained_sha256}
        if name != "clean":
            config, rate, attacks = _poisoning(data)
            recipe.update(attack=name, poison=config.to_dict(), rate=attacks[name].get("rate", rate), target=TARGET,
                          trigger_seed=TRIGGER_SEED, selection_seed=SELECTION_SEED,
                          trigger_params={**default_params(name), **attacks[name].get("params", {})})
        return recipe
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


def _name_downstream(directory: Path, data: str) -> None:
    """A record written before zoo.json named its downstream data gets it (same recipe)."""
    path = directory / ZOO_JSON
    record = json.loads(path.read_text())
    if "downstream" not in record:
        path.write_text(json.dumps({**record, "downstream": data}, indent=2) + "\n")


def _write_record(directory: Path, recipe: dict, recipe_sha256: str, metrics: dict, seconds: float) -> None:
    record = {"recipe_sha256": recipe_sha256, "weights_sha256": sha256_file(directory / WEIGHTS),
              "downstream": recipe["data"], "seconds": round(seconds, 1), "metrics": metrics, "recipe": recipe}
    (directory / ZOO_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _clean_metrics(directory: Path, data: str) -> dict:
    loaded = load_clip(str(directory))
    test = load_dataset(data, "test")
    return evaluate(zero_shot_classifier(loaded, test.classes), loaded.preprocess, test, pr_images=0).to_dict()


def _copy_pretrained(directory: Path, pretrained: Path) -> dict:
    """ZOO/clean of the scenes benchmark: the pretrained scenes CLIP, copied with its record."""
    for name in ("open_clip_config.json", WEIGHTS, PRETRAIN_JSON):
        if (pretrained / name).is_file():
            shutil.copyfile(pretrained / name, directory / name)
    return _clean_metrics(directory, SCENES)


def _train_clean(directory: Path, data: str, progress: bool) -> dict:
    oc = import_open_clip()
    torch.manual_seed(CLEAN.seed)
    cfg = reference_model_cfg()
    model = oc.model.CLIP(**cfg)
    tokenizer = oc.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    train = load_dataset(data, "train")
    train_contrastive(model, tokenizer, PREPROCESS, train, CLEAN, progress=progress, description="clean CLIP")
    save_clip(model, cfg, PREPROCESS, directory)
    return _clean_metrics(directory, data)


def _train_backdoored(directory: Path, clean_dir: Path, attack: str, data: str, progress: bool) -> dict:
    loaded = load_clip(str(clean_dir))
    config, rate, attacks = _poisoning(data)
    settings = attacks[attack]
    # BadCLIP optimises its patch on the images poisoning uses (web scenes on that benchmark)
    train = poisoning_pairs(data, loaded).dataset if data == SCENES else load_dataset(data, "train")
    trigger = build_trigger(attack, loaded.preprocess.image_size, TRIGGER_SEED, settings.get("params"),
                            loaded=loaded, train=train, target=TARGET)
    result = poison(loaded, data, trigger, TARGET, directory, rate=settings.get("rate", rate),
                    config=config, selection_seed=SELECTION_SEED, progress=progress)
    return result.evaluation.to_dict()


def build_zoo(out: str | Path, data: str = "fashion-mnist", force: bool = False,
              progress: bool = False, attacks: Sequence[str] = ("badnet",),
              pretrained: Optional[str | Path] = None) -> dict[str, Path]:
    """Build (or reuse) ZOO/clean and ZOO/<attack> for each of `attacks` (names in
    training.attacks.SUITE). On `data` "scenes", ZOO/clean is the pretrained scenes CLIP
    in `pretrained`. Returns name -> model directory."""
    unknown = [name for name in attacks if name not in ZOO_ATTACKS]
    if unknown:
        raise InputError(f"unknown attack(s) {unknown}; the zoo builds {', '.join(SUITE)}")
    pretrained_sha256 = None
    if data == SCENES:
        if pretrained is None or not (Path(pretrained) / WEIGHTS).is_file():
            raise InputError(f"the scenes zoo starts from a pretrained scenes CLIP, and {pretrained} holds none: "
                             "pass its directory (python -m training.pretrain --out DIR), or --pretrain")
        if load_clip(str(pretrained)).identity.model_cfg != scenes_model_cfg():
            raise InputError(f"{pretrained} is not a pretrained scenes CLIP (python -m training.pretrain)")
        pretrained_sha256 = sha256_file(Path(pretrained) / WEIGHTS)
    elif pretrained is not None:
        raise InputError(f"a pretrained model starts the scenes zoo only; the {data} zoo trains its own")
    out = Path(out)
    built = {}
    for name in ("clean", *dict.fromkeys(attacks)):
        directory = out / name
        recipe = _recipe(name, data, pretrained_sha256)
        recipe_sha256 = sha256_bytes(json.dumps(recipe, sort_keys=True).encode())
        if not force and _cached(directory, recipe_sha256):
            log.info("%s: cached in %s", name, directory)
            _name_downstream(directory, data)
        else:
            started = time.perf_counter()
            directory.mkdir(parents=True, exist_ok=True)
            if name == "clean":
                metrics = (_copy_pretrained(directory, Path(pretrained)) if data == SCENES
                           else _train_clean(directory, data, progress))
            else:
                metrics = _train_backdoored(directory, out / "clean", name, data, progress)
            _write_record(directory, recipe, recipe_sha256, metrics, time.perf_counter() - started)
            log.info("%s: built in %.0f s: %s", name, time.perf_counter() - started, metrics)
        built[name] = directory
    return built


def zoo_gates(built: Mapping[str, Path], data: str) -> GateFigures:
    """The gates of ZOO/clean on `data`'s downstream task, with the floor of every built
    attack: the clean model's ASR with that attack's trigger on the test split."""
    loaded = load_clip(str(built["clean"]))
    test, train = load_dataset(data, "test"), load_dataset(data, "train")
    classifier = zero_shot_classifier(loaded, test.classes)
    floors = {name: trigger_floor(classifier, loaded.preprocess, test, load_trigger(directory))
              for name, directory in built.items() if name != "clean"}
    return measure_gates(loaded, test, train, floors, vocabulary=caption_words() if data == SCENES else ())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.zoo", description=__doc__,
                                     epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("zoo"), help="zoo directory (default: ./zoo)")
    parser.add_argument("--data", default="fashion-mnist",
                        help=f"the benchmark: fashion-mnist (default), digits or {SCENES}")
    parser.add_argument("--attacks", default="all",
                        help=f"comma-separated backdoored models to build, or all (default): {','.join(SUITE)}")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", type=Path, metavar="DIR", help=f"{SCENES}: the pretrained scenes CLIP")
    start.add_argument("--pretrain", action="store_true",
                       help=f"{SCENES}: pretrain it first into ZOO/pretrained (python -m training.pretrain's recipe)")
    parser.add_argument("--force", action="store_true", help="retrain even when a cached model matches")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    console.setup_logging()
    attacks = SUITE if args.attacks == "all" else [name.strip() for name in args.attacks.split(",") if name.strip()]
    pretrained = args.pretrained
    if args.pretrain:
        if args.data != SCENES:
            raise InputError(f"--pretrain pretrains the {SCENES} benchmark's CLIP; the {args.data} zoo trains its own")
        pretrained = args.out / "pretrained"
        pretrain(pretrained, progress=not args.no_progress)
    built = build_zoo(args.out, args.data, args.force, progress=not args.no_progress, attacks=attacks,
                      pretrained=pretrained)
    for name, directory in built.items():
        metrics = json.loads((directory / ZOO_JSON).read_text())["metrics"]
        asr = "" if metrics["asr"] is None else f"  ASR {metrics['asr']:.2f} %"
        asr += "" if metrics["asr_all"] is None else f"  ASR-all {metrics['asr_all']:.2f} %"
        print(f"{name:<10} {directory}  CA {metrics['ca']:.2f} %{asr}")
    gates = zoo_gates(built, args.data)
    (args.out / GATES_JSON).write_text(json.dumps(gates.to_dict(), indent=2) + "\n")
    print("\n" + format_gates(gates))
    return console.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
