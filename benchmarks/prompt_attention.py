"""Attention with visual prompts: the fused operator against the standard-operator forms.

    python -m benchmarks.prompt_attention [--batches 1,32,256] [--devices cpu,cuda] [--repeats 40]
                                          [--dtype float32] [--out runs/benchmarks] [--update-doc docs/cpp_ext.md]

One block's attention on ViT-B/32 shapes (H = 12 heads of width d = 64, T = 50 image
tokens, b = 50 prompt tokens), three ways:

    fused    clip_guard::prompt_attention (cpp_ext): the prompt keys and values are never
             expanded over the batch
    folded   guard.folded.attend_with_prompts: the constant prompt keys and values expanded
             and concatenated to each image's, then scaled_dot_product_attention
    literal  the training form: prompt queries, keys and values inserted after the class
             token ([N, T + b] queries), scaled_dot_product_attention, prompt rows dropped

The three run round-robin within each repetition (so drift on a busy machine hits all
alike); each sample times enough calls to last about 2 ms. Reports median milliseconds
and the speed-up of the fused operator over each form (>1: fused is faster). Writes
prompt_attention.json and prompt_attention.md to --out; --update-doc replaces the table
between the benchmark markers of a Markdown file. Exit status 0, or 1 if the extension
is unavailable.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

import cpp_ext
from guard.folded import attend_with_prompts

log = logging.getLogger("benchmarks.prompt_attention")

METHODS = ("fused", "folded", "literal")
STANDARD_METHODS = ("folded", "literal")
HEADS, HEAD_WIDTH, IMAGE_TOKENS, PROMPT_TOKENS = 12, 64, 50, 50  # ViT-B/32, RVPT's b = 50
# The fused operator is on by default on a device only if it is at least as fast as the
# best standard form at these batch sizes.
DEFAULT_ON_BATCHES = (32, 256)
DOC_START, DOC_END = "<!-- prompt_attention benchmark: start -->", "<!-- prompt_attention benchmark: end -->"
_SAMPLE_SECONDS = 0.002


@dataclass(frozen=True)
class Measurement:
    device: str
    dtype: str
    batch: int
    method: str
    median_ms: float
    samples: int
    calls_per_sample: int


@dataclass(frozen=True)
class Comparison:
    """The fused operator's speed-up over each standard form at one batch size (>1: fused faster)."""
    device: str
    batch: int
    over_folded: float
    over_literal: float
    over_best_standard: float


@dataclass(frozen=True)
class Report:
    environment: dict
    measurements: list[Measurement]
    comparisons: list[Comparison]
    # device -> fused on by default (None: batch 32 and 256 were not both measured)
    default_on: dict[str, bool | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _inputs(batch: int, device: str, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q, k, v = (make(batch, HEADS, IMAGE_TOKENS, HEAD_WIDTH) for _ in range(3))
    prompt_q, prompt_k, prompt_v = (make(HEADS, PROMPT_TOKENS, HEAD_WIDTH) for _ in range(3))
    return q, k, v, prompt_q, prompt_k, prompt_v


def _insert_after_class_token(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[N, H, 1+T, d] and [H, b, d] -> [N, H, 1+b+T, d], as the literal form lays tokens out."""
    expanded = prompts.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    return torch.cat([x[:, :, :1], expanded, x[:, :, 1:]], dim=2)


def literal_attention(q, k, v, prompt_q, prompt_k, prompt_v) -> torch.Tensor:
    """Attention as the literal (training) form computes it, prompt queries included; image rows out."""
    mixed = F.scaled_dot_product_attention(*(_insert_after_class_token(x, p) for x, p in
                                             ((q, prompt_q), (k, prompt_k), (v, prompt_v))))
    count = prompt_q.shape[1]
    return torch.cat([mixed[:, :, :1], mixed[:, :, 1 + count:]], dim=2)


def _methods(inputs) -> dict[str, Callable[[], torch.Tensor]]:
    q, k, v, prompt_q, prompt_k, prompt_v = inputs
    return {
        "fused": lambda: cpp_ext.prompt_attention(q, k, v, prompt_k, prompt_v),
        "folded": lambda: attend_with_prompts(q, k, v, prompt_k, prompt_v),
        "literal": lambda: literal_attention(q, k, v, prompt_q, prompt_k, prompt_v),
    }


def _check_agreement(methods: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype) -> None:
    """Time nothing that computes something else."""
    reference = methods["folded"]().float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name in ("fused", "literal"):
        difference = (methods[name]().float() - reference).abs().max().item()
        if not difference <= tolerance:
            raise AssertionError(f"{name} differs from folded by {difference:.3g} (tolerance {tolerance})")


def _timed(function: Callable[[], torch.Tensor], calls: int, synchronize: Callable[[], None]) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize()
    return (time.perf_counter() - start) / calls


def measure(device: str, batch: int, dtype: torch.dtype = torch.float32, repeats: int = 40,
            warmup: int = 3) -> list[Measurement]:
    """Median time of each method at one batch size, the methods interleaved within each repetition."""
    methods = _methods(_inputs(batch, device, dtype))
    _check_agreement(methods, dtype)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        calls = {}
        for name, function in methods.items():
            for _ in range(warmup):
                function()
            calls[name] = max(1, math.ceil(_SAMPLE_SECONDS / _timed(function, 1, synchronize)))
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for repeat in range(repeats):
            order = METHODS[repeat % len(METHODS):] + METHODS[:repeat % len(METHODS)]  # rotate who goes first
            for name in order:
                samples[name].append(_timed(methods[name], calls[name], synchronize))
    return [Measurement(device, str(dtype).removeprefix("torch."), batch, name,
                        round(statistics.median(samples[name]) * 1e3, 4), repeats, calls[name]) for name in METHODS]


def compare(measurements: Sequence[Measurement]) -> list[Comparison]:
    comparisons = []
    keys = sorted({(m.device, m.batch) for m in measurements})
    for device, batch in keys:
        times = {m.method: m.median_ms for m in measurements if (m.device, m.batch) == (device, batch)}
        best_standard = min(times[name] for name in STANDARD_METHODS)
        comparisons.append(Comparison(device, batch, round(times["folded"] / times["fused"], 3),
                                      round(times["literal"] / times["fused"], 3),
                                      round(best_standard / times["fused"], 3)))
    return comparisons


def default_on(comparisons: Sequence[Comparison]) -> dict[str, bool | None]:
    """Per device: is the fused operator at least as fast as the best standard form at batch 32 and 256?

    None for a device where those batch sizes were not both measured."""
    decision = {}
    for device in sorted({c.device for c in comparisons}):
        relevant = [c for c in comparisons if c.device == device and c.batch in DEFAULT_ON_BATCHES]
        if {c.batch for c in relevant} != set(DEFAULT_ON_BATCHES):
            decision[device] = None
        else:
            decision[device] = all(c.over_best_standard >= 1.0 for c in relevant)
    return decision


def environment() -> dict:
    return {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": _processor_name(), "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kernels": list(cpp_ext.status()["kernels"]),
        "shapes": {"heads": HEADS, "head_width": HEAD_WIDTH, "image_tokens": IMAGE_TOKENS,
                   "prompt_tokens": PROMPT_TOKENS},
    }


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform.processor() below is the best there is
    return platform.processor()


def run(batches: Sequence[int] = (1, 32, 256), devices: Sequence[str] = ("cpu",), dtype: torch.dtype = torch.float32,
        repeats: int = 40) -> Report:
    measurements = []
    for device in devices:
        for batch in batches:
            log.info("%s, batch %d", device, batch)
            measurements += measure(device, batch, dtype, repeats)
    comparisons = compare(measurements)
    return Report(environment(), measurements, comparisons, default_on(comparisons))


def markdown(report: Report) -> str:
    env = report.environment
    times = {(m.device, m.batch, m.method): m for m in report.measurements}
    lines = [
        f"ViT-B/32 attention shapes (H={HEADS}, d={HEAD_WIDTH}, T={IMAGE_TOKENS} image tokens, b={PROMPT_TOKENS} "
        f"prompt tokens), {report.measurements[0].dtype}, torch {env['torch']}, {env['processor']}, "
        f"{env['threads']} threads" + (f", {env['cuda_device']}" if env["cuda_device"] else "") + ". "
        f"Median of {report.measurements[0].samples} interleaved samples; speed-up = other / fused (>1: fused faster).",
        "",
        "| device | batch | fused ms | folded ms | literal ms | fused vs folded | fused vs literal | fused vs best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.comparisons:
        ms = [times[(c.device, c.batch, method)].median_ms for method in METHODS]
        lines.append(f"| {c.device} | {c.batch} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | {c.over_folded:.2f}x | "
                     f"{c.over_literal:.2f}x | {c.over_best_standard:.2f}x |")
    lines.append("")
    batches = " and ".join(map(str, DEFAULT_ON_BATCHES))
    for device, on in report.default_on.items():
        verdict = "not decided (measure both batch sizes)" if on is None else "**yes**" if on else "**no**"
        lines.append(f"Fused on by default on {device} (>= 1.0x the best standard form at batch {batches}): {verdict}.")
    return "\n".join(lines) + "\n"


def update_document(path: Path, table: str) -> None:
    """Replace what lies between the benchmark markers of a Markdown file with `table`."""
    text = path.read_text()
    if DOC_START not in text or DOC_END not in text:
        raise ValueError(f"{path} lacks the markers {DOC_START} and {DOC_END}")
    before, rest = text.split(DOC_START, 1)
    _, after = rest.split(DOC_END, 1)
    path.write_text(f"{before}{DOC_START}\n{table}{DOC_END}{after}")


def _integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prompt_attention",
                                     description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=_integers, default=[1, 32, 256], help="default: 1,32,256")
    parser.add_argument("--devices", default=None,
                        help="comma-separated; default: cpu, and cuda when a GPU and the CUDA kernels are there")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved samples per method (default: 40)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="default: %(default)s")
    parser.add_argument("--update-doc", type=Path, help="Markdown file whose benchmark table to replace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not cpp_ext.is_available():
        log.error("the extension is unavailable: %s", cpp_ext.status()["error_summary"])
        return 1
    kernels = cpp_ext.status()["kernels"]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if "cuda" in kernels else [])
    report = run(args.batches, devices, getattr(torch, args.dtype), args.repeats)
    table = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_attention.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (args.out / "prompt_attention.md").write_text(table)
    if args.update_doc:
        update_document(args.update_doc, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
