"""Check compiled models against their artifact on real images.

    python -m export.parity PURIFIED COMPILED... [--data fashion-mnist | --data DIR] [--limit N] [--json OUT]

Runs the artifact's literal torch model (the form it was trained as) and every
compiled file (.onnx, .pt2, .engine) on the same preprocessed real images (the
Fashion-MNIST test set, or an image folder: export/images.py) and reports
per file the top-1 agreement and the largest |logit difference| in units of the logit
scale. A file fails when its top-1 agreement is below 99.9 % (99 % for int8) or its
difference exceeds the tolerance of its precision (export.common.TOLERANCES); the exit
code is then 4.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

import guard
from guard import console
from guard.artifact import load_artifact
from guard.errors import ExportError
from guard.runtime import build_classifier

from .common import TOLERANCES, Parity, parity
from .images import FASHION_MNIST, parity_images

log = logging.getLogger(__name__)

# Top-1 agreement each precision must reach. Dynamic int8 quantisation is lossy by
# design; it is held to 99 % and documented as such.
MIN_TOP1_AGREEMENT = {"fp32": 0.999, "fp16": 0.999, "int8": 0.99}


def compare_on_images(artifact_path: str | Path, compiled: list[str | Path], images: torch.Tensor,
                      batch_size: int = 256) -> dict[str, tuple[str, Parity]]:
    """{compiled path: (precision, parity against the literal torch model)} on raw images [N, 3, H, W] in [0, 1]."""
    artifact = load_artifact(artifact_path)
    reference_model = build_classifier(artifact, "cpu")
    preprocess = artifact.preprocess
    with torch.inference_mode():
        pieces = [reference_model(preprocess(chunk)) for chunk in images.split(batch_size)]
    reference = (torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
    results = {}
    for path in compiled:
        with guard.load(path) as model:
            pieces = [model.forward(preprocess(chunk)) for chunk in images.split(batch_size)]
            candidate = (torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
            results[str(path)] = (model.manifest["precision"], parity(reference, candidate, artifact.logit_scale))
    return results


def failures(results: dict[str, tuple[str, Parity]]) -> list[str]:
    problems = []
    for path, (precision, result) in results.items():
        if result.top1_agreement < MIN_TOP1_AGREEMENT[precision]:
            problems.append(f"{path}: top-1 agreement {100 * result.top1_agreement:.2f} % < "
                            f"{100 * MIN_TOP1_AGREEMENT[precision]:.1f} %")
        if not result.max_logit_diff <= TOLERANCES[precision]:
            problems.append(f"{path}: max |logit diff| {result.max_logit_diff:.2e} > {TOLERANCES[precision]:.0e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0],
                                     epilog=console.EPILOG)
    parser.add_argument("artifact", help="the purified-model directory the files were exported from")
    parser.add_argument("compiled", nargs="+", help=".onnx / .pt2 / .engine files (with their sidecars)")
    parser.add_argument("--data", default=FASHION_MNIST,
                        help="fashion-mnist (its test set), or a directory of images (its test/ sub-folder if it "
                             "has one); default: %(default)s")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    artifact = load_artifact(args.artifact)
    images = parity_images(args.data, artifact.preprocess, args.limit)
    results = compare_on_images(args.artifact, args.compiled, images)
    print(f"{'file':<40} {'precision':>9} {'top-1 agree':>12} {'max |dlogit|':>13}  (logit-scale units, "
          f"{len(images)} images)")
    for path, (precision, result) in results.items():
        print(f"{Path(path).name:<40} {precision:>9} {100 * result.top1_agreement:>11.2f}% "
              f"{result.max_logit_diff:>13.2e}")
    if args.json:
        args.json.write_text(json.dumps({path: {"precision": precision, **result.to_dict()}
                                         for path, (precision, result) in results.items()}, indent=2) + "\n")
    problems = failures(results)
    if problems:
        raise ExportError("parity failed:\n  " + "\n  ".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(console.run(main))
