"""Inference cost of a purified CLIP: plain vs literal prompts vs folded prompts, per backend.

    python -m benchmarks.inference [--models tiny,vit-b-32] [--backends torch,onnxruntime,aoti]
                                   [--batches 1,32,256] [--out docs/benchmarks]

For each model, each backend builds the three forms from real artifacts through the
product's own export paths, then at each batch size runs the three forms round-robin
(so drift on a noisy machine hits all alike) and reports median latency, images/s,
the cost ratios folded/plain and literal/plain, the speed of each backend relative to
eager torch, and the peak memory of one forward pass (measured in a fresh process per
configuration). Models:

    tiny      the reference CLIP (4 blocks, width 128, 32 px), prompts as the demo trains them
    vit-b-32  ViT-B/32 with random weights at 224 px, RVPT's paper settings: b = 50 tokens
              in the last 9 of 12 blocks, 1000 classes

Writes inference.json and inference.md to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from guard._compat import import_open_clip
from guard.artifact import load_artifact, save_artifact
from guard.backends import AOTIBackend, Backend, OnnxRuntimeBackend, TorchBackend
from guard.folded import fold, fused_attention_available
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder
from guard.runtime import build_classifier
from guard.sidecar import read_sidecar

log = logging.getLogger("benchmarks.inference")

FORMS = ("plain", "literal", "folded")
# eager torch and AOTInductor also run the folded form through the clip_guard C++ operator when it is built
FUSED = "folded+fused"
FUSED_BACKENDS = ("torch", "aoti")
BACKENDS = ("torch", "onnxruntime", "aoti")
# name -> (open_clip architecture or config, image size, prompt start block, prompt tokens, classes)
MODELS = {
    "tiny": ("clipguard-tiny", 32, 0, 16, 10),
    "vit-b-32": ("ViT-B-32", 224, 3, 50, 1000),
}


@dataclass
class Measurement:
    model: str
    backend: str
    form: str
    batch: int
    median_ms: float
    images_per_s: float
    repeats: int
    peak_mib: float | None = None  # resident memory added by one forward pass


def _random_clip(model_name: str):
    open_clip = import_open_clip()
    architecture = MODELS[model_name][0]
    if architecture == "clipguard-tiny":
        from training.zoo import reference_model_cfg
        cfg = reference_model_cfg()
    else:
        cfg = open_clip.get_model_config(architecture)
    torch.manual_seed(0)
    return open_clip.model.CLIP(**cfg).eval(), cfg


def write_artifacts(model_name: str, directory: Path) -> dict[str, Path]:
    """An artifact per form: plain (no prompts) and prompted (the literal and folded forms)."""
    _, image_size, start_block, tokens, classes = MODELS[model_name]
    clip, cfg = _random_clip(model_name)
    encoder = PromptedVisionEncoder(clip.visual)
    prompts = encoder.new_prompts(start_block, tokens)
    generator = torch.Generator().manual_seed(1)
    common = dict(base_model={"spec": f"random {MODELS[model_name][0]}", "sha256": None, "quick_gelu": False,
                              "model_cfg": cfg},
                  vision_state=clip.visual.state_dict(), prompt_start_block=start_block,
                  text_features=torch.randn(classes, cfg["embed_dim"], generator=generator), logit_scale=100.0,
                  classes=[f"class {index}" for index in range(classes)], templates=["a photo of a {}."],
                  preprocess=Preprocess(image_size, (0.5,) * 3, (0.5,) * 3), method="benchmark",
                  hyperparameters={}, metrics={})
    return {"plain": save_artifact(directory / "plain", visual_prompts=None, **common),
            "prompted": save_artifact(directory / "prompted", visual_prompts=prompts.tokens.detach(), **common)}


def build_backend(backend: str, form: str, artifacts: dict[str, Path], directory: Path) -> Backend:
    """The product path for (backend, form): eager modules, or files from export.onnx / export.aoti."""
    artifact = artifacts["plain" if form == "plain" else "prompted"]
    export_form = "literal" if form == "literal" else "folded"
    cpu = torch.device("cpu")
    if backend == "torch":
        model = build_classifier(load_artifact(artifact), cpu)
        return TorchBackend(model if form == "literal" else fold(model, fused=form == FUSED), cpu)
    if backend == "onnxruntime":
        from export.onnx import export_onnx
        path = directory / f"{form}.onnx"
        if not path.exists():
            export_onnx(artifact, path, form=export_form, validation_count=2)
        # The forms' sessions alternate; spinning workers of one would slow the next one down.
        return OnnxRuntimeBackend(path, cpu, spinning=False)
    from export.aoti import export_aoti
    path = directory / f"{form}.pt2"
    if not path.exists():
        export_aoti(artifact, path, form=export_form, fused=form == FUSED, max_batch=512, validation_count=2)
    return AOTIBackend(path, cpu, read_sidecar(path, "aoti")["aoti"])


def _time(backend: Backend, images: torch.Tensor) -> float:
    started = time.perf_counter()
    backend.run(images)
    return time.perf_counter() - started


def time_forms(backends: dict[str, Backend], images: torch.Tensor, seconds: float) -> dict[str, list[float]]:
    """Round-robin timings of every form on the same images until about `seconds` per form."""
    first = {form: _time(backend, images) for form, backend in backends.items()}  # warm-up
    repeats = max(3, min(30, round(seconds / max(first.values()))))
    times = {form: [] for form in backends}
    for _ in range(repeats):
        for form, backend in backends.items():
            times[form].append(_time(backend, images))
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _peak_memory_child(queue, backend, form, artifacts, directory, batch, image_size):
    engine = build_backend(backend, form, artifacts, directory)
    images = torch.randn(batch, 3, image_size, image_size)
    engine.run(images[:1])
    # Building the engine (export, validation) peaks higher than one forward pass: reset the
    # process's high-water mark (Linux: "5" > clear_refs) so only the forward pass counts.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    engine.run(images)
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(backend, form, artifacts, directory, batch, image_size) -> float:
    """Resident memory one forward pass adds, in a fresh process so earlier peaks do not hide it."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child,
                            args=(queue, backend, form, artifacts, directory, batch, image_size))
    child.start()
    child.join()
    return round(queue.get(timeout=5), 1) if child.exitcode == 0 else float("nan")


def run(models, backends, batches, seconds: float, memory: bool) -> list[Measurement]:
    results = []
    for model_name in models:
        image_size = MODELS[model_name][1]
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            artifacts = write_artifacts(model_name, scratch)
            for backend in backends:
                log.info("%s / %s: building the three forms", model_name, backend)
                forms = FORMS + ((FUSED,) if backend in FUSED_BACKENDS and fused_attention_available() else ())
                engines = {form: build_backend(backend, form, artifacts, scratch) for form in forms}
                for batch in batches:
                    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
                    times = time_forms(engines, images, seconds)
                    for form in forms:
                        median = statistics.median(times[form])
                        peak = (peak_memory_mib(backend, form, artifacts, scratch, batch, image_size)
                                if memory else None)
                        results.append(Measurement(model_name, backend, form, batch, round(1000 * median, 3),
                                                   round(batch / median, 1), len(times[form]), peak))
                    log.info("%s / %s / batch %d: %s", model_name, backend, batch,
                             ", ".join(f"{r.form} {r.median_ms:.1f} ms" for r in results[-len(forms):]))
                for engine in engines.values():
                    engine.close()
    return results


def ratios(results: list[Measurement]) -> list[dict]:
    """Per model, backend and batch: folded/plain and literal/plain latency, and speed-up over eager torch."""
    index = {(r.model, r.backend, r.form, r.batch): r.median_ms for r in results}
    rows = []
    for (model, backend, form, batch), _ in index.items():
        if form != "plain":
            continue
        plain = index[(model, backend, "plain", batch)]
        row = {"model": model, "backend": backend, "batch": batch,
               "folded_over_plain": round(index[(model, backend, "folded", batch)] / plain, 3),
               "literal_over_plain": round(index[(model, backend, "literal", batch)] / plain, 3)}
        fused = index.get((model, backend, FUSED, batch))
        if fused is not None:
            row["fused_over_plain"] = round(fused / plain, 3)
        torch_folded = index.get((model, "torch", "folded", batch))
        if torch_folded is not None:
            row["speedup_over_torch_folded"] = round(torch_folded / index[(model, backend, "folded", batch)], 3)
        rows.append(row)
    return rows


def markdown(results: list[Measurement], ratio_rows: list[dict], environment: dict) -> str:
    lines = ["# Inference benchmark", "",
             f"`python -m benchmarks.inference` on {environment['cpu']} ({environment['threads']} threads), "
             f"torch {environment['torch']}, onnxruntime {environment['onnxruntime']}. "
             "Median latency of one batch of preprocessed images; the three forms ran round-robin in one process.",
             "", "## Cost ratios (latency relative to the plain CLIP on the same backend and batch)", "",
             "| model | backend | batch | folded / plain | literal / plain | folded+fused / plain "
             "| speed-up over eager torch (folded) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in ratio_rows:
        fused = f"{row['fused_over_plain']:.3f}" if "fused_over_plain" in row else "–"
        speedup = f"{row['speedup_over_torch_folded']:.2f}x" if "speedup_over_torch_folded" in row else "–"
        lines.append(f"| {row['model']} | {row['backend']} | {row['batch']} | {row['folded_over_plain']:.3f} | "
                     f"{row['literal_over_plain']:.3f} | {fused} | {speedup} |")
    lines += ["", "## Measurements", "",
              "| model | backend | form | batch | median ms | images/s | repeats | peak MiB |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        peak = "–" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.model} | {r.backend} | {r.form} | {r.batch} | {r.median_ms:.2f} | {r.images_per_s:.1f} | "
                     f"{r.repeats} | {peak} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort_version,
            "python": platform.python_version()}


def _names(text: str, allowed) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(allowed)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda text: _names(text, MODELS), default=list(MODELS))
    parser.add_argument("--backends", type=lambda text: _names(text, BACKENDS), default=["torch", "onnxruntime"])
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 32, 256])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per form and configuration")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the per-configuration peak-memory processes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    started = time.perf_counter()
    results = run(args.models, args.backends, args.batches, args.seconds, args.memory)
    ratio_rows = ratios(results)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "seconds": round(time.perf_counter() - started, 1),
              "ratios": ratio_rows, "measurements": [asdict(r) for r in results]}
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "inference.md").write_text(markdown(results, ratio_rows, env))
    print(markdown(results, ratio_rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
