"""Calibrate a model's trigger alert on a built-in data set, with its labels.

    python -m training.calibrate PURIFIED --data fashion-mnist [--split train] [guard calibrate's options]

`python -m guard calibrate` reads image folders only (guard never imports training/);
this command brings the built-in data sets (fashion-mnist, digits, scenes) to it: a
seeded choice of `--limit` images with their labels (which the feature density fits on),
then the same calibration, options and output as `python -m guard calibrate`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from guard import cli, console
from guard.errors import DataError

from .data import BUILTIN_SOURCES, load_dataset


def dataset_images(data: str, split: str, limit: int, seed: int,
                   classes: Sequence[str]) -> tuple[list, str, Optional[list[int]]]:
    """(images, a description, labels or None) of `data`'s split: at most `limit`, a seeded
    random choice when there are more (the one guard's image folders get). The labels come
    along where the data set's classes are the model's."""
    dataset = load_dataset(data, split)
    if not len(dataset):
        raise DataError(f"{data} {split} holds no images")
    images, labels = list(dataset.images), dataset.labels.tolist()
    description = f"{data} {split}"
    if len(images) > limit:
        chosen = sorted(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
        images, labels = [images[index] for index in chosen], [labels[index] for index in chosen]
        description += f", {limit} images chosen with seed {seed}"
    return images, description, labels if tuple(dataset.classes) == tuple(classes) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=console.EPILOG)
    parser.add_argument("model", metavar="PURIFIED", help="purified artifact directory or compiled model")
    parser.add_argument("--data", required=True, help=", ".join(BUILTIN_SOURCES))
    parser.add_argument("--split", choices=("train", "test"), default="train", help="split of the data set (train)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages on stderr")
    cli.add_calibration_options(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup_logging(args.verbose)
    return cli.calibrate_from(args, lambda limit, classes: dataset_images(args.data, args.split, limit, args.seed,
                                                                           classes))


if __name__ == "__main__":
    sys.exit(console.run(main))
