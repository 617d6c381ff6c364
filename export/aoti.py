"""Compile a purified artifact ahead of time with AOTInductor.

    python -m export.aoti PURIFIED --out purified.pt2 [--device cpu|cuda] [--max-batch N]

The package holds generated C++ (and CUDA) code for the folded forward pass with a
dynamic batch axis, loads with `guard.load("purified.pt2")` and needs no Python model
code. A package runs only on the device type it was compiled for, which its sidecar
records. Compiling takes a while (about half a minute for the tiny reference model
on 2 cores) because it invokes the C++ compiler.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from guard import console
from guard.errors import ExportError, InputError
from guard.folded import fused_attention_available
from guard.sidecar import INPUT_NAME, sidecar_path, write_sidecar

from .common import check_parity, parity, serving_model, validation_images

log = logging.getLogger(__name__)


def export_aoti(artifact_path: str | Path, out: str | Path, *, device: str = "cpu", max_batch: int = 1024,
                form: str = "folded", fused: bool | None = None, validation_count: int = 16) -> Path:
    """Write the AOTInductor package `out` (and its sidecar); returns the sidecar path.

    fused: compile the folded attention as calls of the clip_guard C++ operator (cpp_ext);
    None does where serving would, on the CPU when it is built (guard.folded.fold). A fused
    package needs the operator built wherever it is loaded; the sidecar records it."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise InputError(f"the output file must end in .pt2, got {out}")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda needs a CUDA GPU; none is available here")
    if max_batch < 2:
        raise InputError(f"max_batch must be at least 2, got {max_batch}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, sidecar_path(out)):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    if fused is None:
        fused = form == "folded" and device == "cpu" and fused_attention_available()
    model, artifact = serving_model(artifact_path, form, fused=fused)
    model = model.to(device)
    images = validation_images(artifact.preprocess, validation_count).to(device)
    with torch.no_grad():
        reference = model(images)

    log.info("compiling %s for %s with AOTInductor (this invokes the C++ compiler)", artifact.path, device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (images[:2],), dynamic_shapes={INPUT_NAME: {0: batch}})
            torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except Exception as error:  # inductor and the C++ compiler raise many unrelated types
        raise ExportError(f"AOTInductor could not compile {artifact.path}: {error}") from error

    runner = torch._inductor.aoti_load_package(str(out))
    with torch.no_grad():
        compiled = runner(images)
    result = parity(tuple(t.cpu() for t in reference), tuple(t.cpu() for t in compiled), artifact.logit_scale)
    check_parity(result, "fp32", f"the AOTInductor package {out}")
    details = {"device": device, "form": form, "fused_attention": fused, "max_batch": max_batch,
               "validation": result.to_dict(),
               "export_seconds": round(time.perf_counter() - started, 2), "torch_version": torch.__version__}
    sidecar = write_sidecar(out, kind="aoti", source_manifest=artifact.manifest, source_path=str(artifact.path),
                            precision="fp32", details=details)
    log.info("wrote %s in %.0f s: max |logit diff| %.2e of the logit scale", out, details["export_seconds"],
             result.max_logit_diff)
    return sidecar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.aoti", description=__doc__.split("\n\n")[0],
                                     epilog=console.EPILOG)
    parser.add_argument("artifact", help="purified-model directory (from python -m training.purify)")
    parser.add_argument("--out", required=True, help="output .pt2 package; its sidecar is written beside it")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to compile for")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch the package accepts")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="call the clip_guard C++ attention operator (default: on the CPU when it is built)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    export_aoti(args.artifact, args.out, device=args.device, max_batch=args.max_batch, fused=args.fused)
    return 0


if __name__ == "__main__":
    sys.exit(console.run(main))
