"""The reference run, offline and without arguments:

    python -m training [--zoo zoo] [--runs runs]

builds the reference CLIPs (clean and BadNet-backdoored, cached), purifies the
backdoored one with RVPT and with plain VPT (alpha = 0) from 16 clean shots per
class, compiles the RVPT artifact to ONNX (prompts folded, checked against torch
on the whole test set), calibrates its trigger alert at 1 % false alarms on clean
training images, classifies test images with the compiled model through
`guard.load` (labels and alerts, clean and triggered), and prints CA / ASR / PR
before and after and the alert rates, also written to RUNS/summary.json and
RUNS/summary.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from guard import console
from guard import load
from guard.calibration import calibrate
from guard.errors import ExportError

from .attacks import load_trigger
from .data import load_dataset
from .evaluate import format_summary
from .plots import plot_summary
from .purify import purify
from .zoo import build_zoo


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo"), help="reference model directory (cached)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where artifacts and the summary go")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    console.setup_logging()
    progress = not args.no_progress
    zoo = build_zoo(args.zoo, progress=progress)
    rvpt = purify(str(zoo["badnet"]), "fashion-mnist", args.runs / "rvpt", method="rvpt", progress=progress)
    vpt = purify(str(zoo["badnet"]), "fashion-mnist", args.runs / "vpt", method="vpt", progress=progress)
    compiled = _compile(args.runs / "rvpt", args.runs / "rvpt.onnx")
    calibration = _calibrate(compiled)
    rows = {"backdoored": rvpt.before, "RVPT (alpha 2)": rvpt.after, "VPT (alpha 0)": vpt.after}
    print("\nFashion-MNIST test set, BadNet-backdoored reference CLIP, 16 shots per class\n")
    print(format_summary(rows))
    alerts = {"calibration": calibration, **_serve(compiled, zoo["badnet"])}
    args.runs.mkdir(parents=True, exist_ok=True)
    summary = {**{k: v.to_dict() for k, v in rows.items()}, "alerts": alerts}
    (args.runs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {plot_summary(rows, args.runs / 'summary.png')} and {args.runs / 'summary.json'}")
    return 0


def _compile(artifact: Path, out: Path) -> Path:
    """Export the artifact to ONNX and check it against the torch model on the whole test set."""
    from export.onnx import export_onnx
    from export.parity import compare_on_images, failures

    export_onnx(artifact, out)
    test = load_dataset("fashion-mnist", "test")
    ((precision, result),) = compare_on_images(artifact, [out], test.images).values()
    print(f"\ncompiled {out}: top-1 agreement with torch {100 * result.top1_agreement:.2f} % and max |logit "
          f"difference| {result.max_logit_diff:.1e} of the logit scale on {result.images} test images")
    problems = failures({str(out): (precision, result)})
    if problems:
        raise ExportError("; ".join(problems))
    return out


def _seeded(count: int, total: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def _calibrate(compiled: Path, count: int = 2000) -> dict:
    """Set the compiled model's alert threshold at 1 % false alarms on clean training images."""
    train = load_dataset("fashion-mnist", "train")
    images = train.images[_seeded(count, len(train))]
    record = calibrate(compiled, list(images), fpr=0.01, data=f"fashion-mnist train, {count} seeded images")
    print(f"\ncalibrated the trigger alert of {compiled}: threshold {record['threshold']:.4f} at 1 % false "
          f"alarms on {record['images']} clean training images")
    return record


def _serve(artifact: Path, backdoored: Path, count: int = 2000, shown: int = 6) -> dict:
    """Classify seeded clean and triggered test images with the served (compiled) model via
    guard.load: print a few, and return how often the calibrated alert fires on each."""
    test = load_dataset("fashion-mnist", "test")
    backdoor = load_trigger(backdoored)
    chosen = _seeded(count, len(test), seed=1)
    labels = test.labels[chosen]
    attacked = labels != backdoor.target  # target-class images cannot be flipped
    with load(artifact) as guard:
        images = guard.preprocess.resize(test.images[chosen])
        clean = guard.classify(list(images))
        triggered = guard.classify(list(backdoor.trigger(images[attacked])))
    print(f"\nguard.load({str(artifact)!r}).classify(...) on test images (trigger target: {backdoor.target_name}):")
    for label, plain, hit in list(zip(labels[attacked], [r for r, a in zip(clean, attacked) if a], triggered))[:shown]:
        print(f"  true {test.classes[label]:<11} clean -> {plain.label:<11} ({plain.alert_status:<5})"
              f"  triggered -> {hit.label:<11} ({hit.alert_status})")
    rates = {"clean_alert_rate": sum(r.alert for r in clean) / len(clean),
             "triggered_alert_rate": sum(r.alert for r in triggered) / len(triggered),
             "clean_images": len(clean), "triggered_images": len(triggered)}
    print(f"trigger alerts: {100 * rates['clean_alert_rate']:.2f} % of {len(clean)} clean test images, "
          f"{100 * rates['triggered_alert_rate']:.2f} % of {len(triggered)} triggered ones")
    return rates

if __name__ == "__main__":
    sys.exit(main())
