"""What the trigger alert costs: Guard.classify with alerts against without, side by side.

    python -m benchmarks.alerts [--models tiny,vit-b-32] [--backends torch,onnxruntime]
                                [--batches 1,32] [--out docs/benchmarks]

For each model and backend the prompted artifact of benchmarks.inference is served
through guard.load (the torch backend from the artifact, onnxruntime from its folded
ONNX export), and the same uint8 images are classified with and without the alert,
round-robin in one process, so drift on a noisy machine hits both alike. Reports the
median latencies, the ratio with / without, and the share of the perturbations
themselves (expand_batch on the resized images). On the torch backend it also times the
opt-in alerts that only it serves (docs/detection.md): the default alert plus the
frozen-tower view (4 rows per image), the feature density on the served tower (1 row,
its density fitted on random features of the right width) and the input detector (1 row
and the detector's CNN on the resized image, its weights untrained): the cost depends on
the shapes, not on the fit.
Writes alerts.json and alerts.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

import guard
from benchmarks.inference import MODELS, _names, environment, write_artifacts
from guard.alerts import FROZEN_TOWER, AlertConfig, expand_batch
from guard.density import ClassDensity
from guard.detector import InputDetector
from guard.inputs import resize_batch

log = logging.getLogger("benchmarks.alerts")

BACKENDS = ("torch", "onnxruntime")


def serve(backend: str, artifact: Path, directory: Path) -> guard.Guard:
    if backend == "torch":
        return guard.load(artifact, device="cpu")
    from export.onnx import export_onnx
    path = directory / "folded.onnx"
    if not path.exists():
        export_onnx(artifact, path, validation_count=2)
    return guard.load(path, device="cpu")


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def time_alerts(model: guard.Guard, images: list[torch.Tensor], seconds: float) -> dict[str, list[float]]:
    """Round-robin timings of classify without alerts, with alerts, of the perturbations alone
    and, on the torch backend, of the alert scores with the frozen-tower view, the density
    and the input detector."""
    resized = resize_batch(images, model.preprocess)
    calls = {"plain": lambda: model.classify(images, batch_size=len(images), alerts=False),
             "alerts": lambda: model.classify(images, batch_size=len(images)),
             "perturbations": lambda: expand_batch(resized, model.alert_config)}
    if model.backend == "torch":
        frozen_view = AlertConfig(model.alert_config.perturbations + (FROZEN_TOWER,))
        classes, width = len(model.classes), model.class_tokens(images[:1])[1].shape[1]
        # the scoring cost depends on the shapes only, so any fit of the right shape will do
        fitted = {"density": ClassDensity.fit(torch.randn(4 * classes, width), torch.arange(4 * classes) % classes,
                                              classes),
                  "detector": InputDetector().eval()}

        def fitted_alert(statistic: str):
            def call():
                model.fitted_alert = fitted[statistic]  # one statistic at a time: calls run in turn
                return model.alert_scores(images, len(images), AlertConfig((), statistic))
            return call
        calls["frozen_view"] = lambda: model.alert_scores(images, len(images), frozen_view)
        calls["density"] = fitted_alert("density")
        calls["detector"] = fitted_alert("detector")
    first = max(_seconds(call) for call in calls.values())  # warm-up
    repeats = max(3, min(30, round(seconds / first)))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(_seconds(call))
    return times


def run(models, backends, batches, seconds: float) -> list[dict]:
    rows = []
    for model_name in models:
        image_size = MODELS[model_name][1]
        with tempfile.TemporaryDirectory() as scratch:
            artifact = write_artifacts(model_name, Path(scratch))["prompted"]
            for backend in backends:
                with serve(backend, artifact, Path(scratch)) as model:
                    for batch in batches:
                        generator = torch.Generator().manual_seed(batch)
                        images = list(torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                                                    generator=generator))
                        times = {name: statistics.median(values)
                                 for name, values in time_alerts(model, images, seconds).items()}
                        rows.append({"model": model_name, "backend": backend, "batch": batch,
                                     "perturbations": list(model.alert_config.perturbations),
                                     "plain_ms": round(1000 * times["plain"], 3),
                                     "alerts_ms": round(1000 * times["alerts"], 3),
                                     "perturbations_ms": round(1000 * times["perturbations"], 3),
                                     "alerts_over_plain": round(times["alerts"] / times["plain"], 3),
                                     **{f"{name}_over_plain": round(times[name] / times["plain"], 3)
                                        for name in ("frozen_view", "density", "detector") if name in times}})
                        log.info("%s / %s / batch %d: without %.1f ms, with alerts %.1f ms (%.2fx)", model_name,
                                 backend, batch, 1000 * times["plain"], 1000 * times["alerts"],
                                 times["alerts"] / times["plain"])
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Trigger-alert overhead", "",
             f"`python -m benchmarks.alerts` on {env['cpu']} ({env['threads']} threads), torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']}. Median latency of `Guard.classify` on a batch of uint8 images "
             "at the model's size, with and without the alert, round-robin in one process.", "",
             "| model | backend | batch | without alerts ms | with alerts ms | with / without | perturbations ms "
             "| + frozen view / without | density / without | detector / without |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(row, name):
        return f"{row[name]:.2f}x" if name in row else "-"
    for row in rows:
        lines.append(f"| {row['model']} | {row['backend']} | {row['batch']} | {row['plain_ms']:.2f} | "
                     f"{row['alerts_ms']:.2f} | {row['alerts_over_plain']:.2f}x | {row['perturbations_ms']:.2f} | "
                     f"{ratio(row, 'frozen_view_over_plain')} | {ratio(row, 'density_over_plain')} | "
                     f"{ratio(row, 'detector_over_plain')} |")
    lines += ["", "The last three columns (torch backend only, the opt-in alerts of docs/detection.md): "
              "`Guard.alert_scores` with the default alert plus the frozen-tower view (4 rows per image), "
              "with the feature density on the served tower (1 row per image), and with the input detector "
              "(1 row per image and the detector's CNN on the resized image), over classify without alerts."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alerts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda text: _names(text, MODELS), default=list(MODELS))
    parser.add_argument("--backends", type=lambda text: _names(text, BACKENDS), default=list(BACKENDS))
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per configuration")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    started = time.perf_counter()
    rows = run(args.models, args.backends, args.batches, args.seconds)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    (args.out / "alerts.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "alerts.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
