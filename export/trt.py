"""Build a TensorRT engine from an exported ONNX graph.

    python -m export.trt purified.onnx --out purified.engine [--fp16] [--batch MIN:OPT:MAX]

Uses the TensorRT 10 tensor-name API: one optimisation profile over the dynamic
batch axis, optional FP16 with LayerNorm and softmax pinned to FP32 (their
reductions lose too much in half precision), parser errors reported one per line,
and a timing cache beside the engine so rebuilds are fast. The engine's sidecar
records the TensorRT version, GPU compute capability, precision and profile;
`guard.load("purified.engine")` refuses an engine built for another TensorRT or
GPU and prints the command that rebuilds it. The engine is checked against
onnxruntime on the same graph before its sidecar is written.

Needs TensorRT 10+ and an NVIDIA GPU; without them it says so and exits with code 3.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from guard import console
from guard.backends import TensorRTBackend, import_tensorrt
from guard.errors import ExportError, InputError, MissingDependencyError
from guard.preprocess import Preprocess
from guard.sidecar import INPUT_NAME, read_sidecar, sidecar_path, write_sidecar

from .common import check_parity, parity, validation_images
from .onnx import run_onnxruntime

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GIB = 4.0


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch axis: the engine accepts min..max, tuned for opt."""
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        parts = text.split(":")
        try:
            values = [int(part) for part in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise InputError(f"--batch takes MIN:OPT:MAX, three integers such as 1:32:256; got {text!r}")
        profile = cls(*values)
        if not 1 <= profile.min <= profile.opt <= profile.max:
            raise InputError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}")
        return profile

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def _pin_to_fp32(network, trt) -> int:
    """Keep LayerNorm and softmax (and their outputs) in FP32 inside an FP16 engine."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, out: str | Path, *, fp16: bool = False,
                 profile: BatchProfile = BatchProfile(1, 32, 256),
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB) -> Path:
    """Build `out` (and its sidecar) from an ONNX graph written by export.onnx; returns the sidecar path."""
    onnx_path, out = Path(onnx_path), Path(out)
    onnx_sidecar = read_sidecar(onnx_path, "onnx")
    if onnx_sidecar["onnx"].get("attention") == "custom":
        raise InputError(f"{onnx_path} has clip_guard::PromptAttention nodes, which need a TensorRT plugin that "
                         "clip-guard does not build yet; build the engine from the standard export "
                         "(`python -m export.onnx PURIFIED --out purified.onnx`)")
    if onnx_sidecar["precision"] != "fp32":
        raise InputError(f"{onnx_path} is a {onnx_sidecar['precision']} graph; build engines from the fp32 "
                         "export and pass --fp16 here, so TensorRT chooses the precision per layer")
    if out.suffix not in (".engine", ".plan"):
        raise InputError(f"the output file must end in .engine or .plan, got {out}")
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependencyError("building a TensorRT engine needs an NVIDIA GPU; none is available here")

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}:\n  {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    size = Preprocess.from_dict(onnx_sidecar["preprocess"]).image_size
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(INPUT_NAME, (profile.min, 3, size, size), (profile.opt, 3, size, size),
                           (profile.max, 3, size, size))
    config.add_optimization_profile(optimisation)
    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_to_fp32(network, trt)

    cache_path = out.with_name(out.name + ".timing-cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is only slower
    log.info("building %s engine from %s (batch %d:%d:%d)", "FP16" if fp16 else "FP32", onnx_path,
             profile.min, profile.opt, profile.max)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(out).unlink(missing_ok=True)
    out.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    device = torch.device("cuda")
    precision = "fp16" if fp16 else "fp32"
    details = {"tensorrt_version": trt.__version__,
               "compute_capability": list(torch.cuda.get_device_capability(device)),
               "gpu": torch.cuda.get_device_name(device), "profile": profile.to_dict(),
               "onnx": str(onnx_path), "fp32_layers": pinned, "timing_cache": cache_path.name,
               "build_seconds": round(time.perf_counter() - started, 2)}
    sidecar = write_sidecar(out, kind="tensorrt", source_manifest=onnx_sidecar, source_path=str(onnx_path),
                            precision=precision, details=details)
    _validate(out, onnx_path, onnx_sidecar, precision, profile)
    return sidecar


def _validate(engine_path: Path, onnx_path: Path, onnx_sidecar: dict, precision: str, profile: BatchProfile):
    """Run the engine and onnxruntime on the same images; refuse the engine if they disagree."""
    images = validation_images(Preprocess.from_dict(onnx_sidecar["preprocess"]), min(16, profile.max))
    backend = TensorRTBackend(engine_path, torch.device("cuda"), read_sidecar(engine_path, "tensorrt"))
    try:
        candidate = backend.run(images)
    finally:
        backend.close()
    result = parity(run_onnxruntime(onnx_path, images, "fp32"), candidate, onnx_sidecar["onnx"]["logit_scale"])
    try:
        check_parity(result, precision, f"the TensorRT engine {engine_path}")
    except ExportError:
        engine_path.unlink(missing_ok=True)
        sidecar_path(engine_path).unlink(missing_ok=True)
        raise
    log.info("engine matches onnxruntime: max |logit diff| %.2e of the logit scale, top-1 agreement %.1f%%",
             result.max_logit_diff, 100 * result.top1_agreement)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0],
                                     epilog=console.EPILOG)
    parser.add_argument("onnx", help="an fp32 .onnx graph from python -m export.onnx (with its sidecar)")
    parser.add_argument("--out", required=True, help="output .engine file; its sidecar is written beside it")
    parser.add_argument("--fp16", action="store_true", help="allow FP16 kernels (LayerNorm and softmax stay FP32)")
    parser.add_argument("--batch", default="1:32:256",
                        help="optimisation profile of the batch axis, MIN:OPT:MAX (default 1:32:256)")
    parser.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB,
                        help="builder workspace limit in GiB")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    build_engine(args.onnx, args.out, fp16=args.fp16, profile=BatchProfile.parse(args.batch),
                 workspace_gib=args.workspace_gib)
    return 0


if __name__ == "__main__":
    sys.exit(console.run(main))
