"""Pretrain a CLIP from scratch on the web-scene corpus (training/scenes.py) and measure
the reference benchmark's gates on it (training/gates.py).

    python -m training.pretrain --out DIR [--epochs 8] [--lr 2e-3] [--init DIR] [--device cuda]

DIR gets an open_clip local dir (any `training.models.load_clip` reads it) and
pretrain.json: the recipe, the weights' checksum, the training time and the gate
figures, with the gates that fail. The architecture is
training/model_configs/clipguard-scenes.json (8 vision blocks, 56 px inputs in 7 x 7
patches of 8 px, a 4-block text tower). On a GPU (`--device cuda`) the scenes are painted
there too, from the same CPU-drawn nuisances, so the corpus does not depend on the device;
the gates are measured on the CPU either way. Exit codes: 0 trained (whether or not the
gates hold: see pretrain.json); otherwise guard.console's table (docs/cli.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch

from guard import cli, console
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.hashing import sha256_file
from guard.preprocess import Preprocess

from .contrastive import ContrastiveConfig, train_contrastive
from .data import load_dataset
from .gates import GateFigures, format_gates, measure_gates
from .models import load_clip, save_clip
from .scenes import SCENES, SIDE, caption_words, web_pairs

log = logging.getLogger(__name__)

ARCHITECTURE = "clipguard-scenes"
PREPROCESS = Preprocess(image_size=SIDE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
RECIPE = ContrastiveConfig(epochs=8.0, batch_size=256, lr=2e-3, weight_decay=0.1, seed=0)
PRETRAIN_JSON = "pretrain.json"


def scenes_model_cfg() -> dict:
    text = resources.files("training").joinpath("model_configs", f"{ARCHITECTURE}.json").read_text()
    return json.loads(text)


def pretrain(out: str | Path, config: ContrastiveConfig = RECIPE, progress: bool = False,
             init: Optional[str | Path] = None, device: str | torch.device = "cpu") -> dict:
    """Train the scenes CLIP with `config` on `device` on web scenes rendered anew every
    epoch, from scratch or from the pretrained CLIP in `init` (a later stage of a longer
    schedule), save it to `out` and record pretrain.json (returned), with `init`'s own
    record. Deterministic for a fixed config, device and thread count."""
    out = Path(out)
    cli.check_device(str(device))
    device = torch.device(device)
    oc = import_open_clip()
    cfg = scenes_model_cfg()
    torch.manual_seed(config.seed)
    model = oc.model.CLIP(**cfg)
    stages = []
    if init is not None:
        start = load_clip(str(init))
        if start.identity.model_cfg != cfg:
            raise InputError(f"--init {init} is not a {ARCHITECTURE} model")
        model.load_state_dict(start.model.state_dict())
        record = Path(init) / PRETRAIN_JSON
        stages = json.loads(record.read_text())["stages"] if record.is_file() else [{"unrecorded": str(init)}]
    tokenizer = oc.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    started = time.perf_counter()
    losses = train_contrastive(model.to(device), tokenizer, PREPROCESS, web_pairs(tokenizer, device=device), config,
                               progress=progress, description="pretraining")
    seconds = time.perf_counter() - started
    save_clip(model.cpu(), cfg, PREPROCESS, out)
    gates = measure_gates(load_clip(str(out)), load_dataset(SCENES, "test"), load_dataset(SCENES, "train"),
                          vocabulary=caption_words())
    stages = stages + [{"training": config.to_dict(), "seconds": round(seconds, 1), "final_loss": losses[-1]}]
    record = {"architecture": cfg, "preprocess": PREPROCESS.to_dict(), "training": config.to_dict(),
              "stages": stages, "weights_sha256": sha256_file(out / "open_clip_model.safetensors"),
              "seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "device": str(device), "final_loss": losses[-1],
              "gates": gates.to_dict()}
    (out / PRETRAIN_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__,
                                     epilog=console.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for the pretrained CLIP")
    parser.add_argument("--epochs", type=float, default=RECIPE.epochs)
    parser.add_argument("--lr", type=float, default=RECIPE.lr, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--seed", type=int, default=RECIPE.seed)
    parser.add_argument("--init", type=Path, help="continue from this pretrained scenes CLIP (a later stage)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to train on (default: CUDA if any)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars on a terminal, a line per 10 %% in a log")
    args = parser.parse_args(argv)
    console.setup_logging()
    record = pretrain(args.out, replace(RECIPE, epochs=args.epochs, lr=args.lr, seed=args.seed),
                      progress=args.progress, init=args.init, device=args.device)
    print(format_gates(GateFigures.from_dict(record["gates"])))
    return console.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
