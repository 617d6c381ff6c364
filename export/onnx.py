"""Export a purified artifact to a self-contained ONNX graph.

    python -m export.onnx PURIFIED --out purified.onnx [--fp16 | --int8] [--literal]

The graph takes `images` (float32 [batch, 3, S, S], preprocessed as the sidecar
says) and returns `logits` [batch, C] and `embedding` [batch, E], with a dynamic
batch axis. The visual prompts are folded into constant keys and values and the
class text embeddings are a constant matrix: no text tower, no Python. Every export
is run once in onnxruntime and compared with the torch reference before its sidecar
(`purified.onnx.json`) is written; a graph outside its tolerance is refused.
`export_onnx(..., attention="custom")` emits each prompted block's attention as one
clip_guard::PromptAttention node instead (export/custom_attention.py), the graph a TensorRT
plugin would run. No runtime here has a kernel for that node (onnxruntime refuses the graph;
the plugin is not built), so it is not on the command line: nothing could serve its output.
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
from guard.backends import OnnxRuntimeBackend
from guard.errors import ExportError, InputError, MissingDependencyError
from guard.sidecar import INPUT_NAME, OUTPUT_NAMES, sidecar_path, write_sidecar

from . import custom_attention
from .common import PRECISIONS, check_parity, parity, serving_model, validation_images

log = logging.getLogger(__name__)

OPSET = 18
ATTENTIONS = ("standard", "custom")
# Weights above this go to an external data file: protobuf caps a file at 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30


class _HalfPrecision(torch.nn.Module):
    """Runs the model in float16 behind float32 inputs and outputs, so callers never change."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, images):
        logits, embedding = self.model(images.half())
        return logits.float(), embedding.float()


def _import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise MissingDependencyError("ONNX export needs onnx, onnxscript and onnxruntime: "
                                     "pip install 'clip-guard[onnxruntime]'") from error
    return onnx


def run_onnxruntime(path: Path, images: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph's outputs on the CPU provider, through the same session set-up as serving."""
    backend = OnnxRuntimeBackend(path, torch.device("cpu"), precision)
    try:
        return backend.run(images)
    finally:
        backend.close()


def _torch_export(model: torch.nn.Module, out: Path, example: torch.Tensor, external_data: bool,
                  translations: dict | None = None) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not the user's business
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes={"images": {0: batch}}, verbose=False,
                                    custom_translation_table=translations)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(out), external_data=external_data)


def export_onnx(artifact_path: str | Path, out: str | Path, *, precision: str = "fp32", form: str = "folded",
                attention: str = "standard", external_data: bool | None = None, validation_count: int = 16) -> Path:
    """Write `out` (and its sidecar) from a purified artifact; returns the sidecar path.

    precision: fp32, fp16 (weights and activations in float16 behind float32 inputs),
    or int8 (dynamic quantisation of the fp32 graph's weights). form: folded (serving)
    or literal (the prompt-concatenation form, for benchmarks). attention: standard
    operators, or "custom": one clip_guard::PromptAttention node per prompted block
    (folded fp32 only; needs the built cpp_ext operator; validated on ONNX's reference
    evaluator, since no runtime here can run it). external_data: None decides
    by the weights' size."""
    onnx = _import_onnx()
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if attention not in ATTENTIONS:
        raise InputError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    custom = attention == "custom"
    if custom and (precision != "fp32" or form != "folded"):
        raise InputError("custom attention nodes exist in the folded fp32 graph only (a TensorRT engine "
                         "chooses its own precision per layer: build it with --fp16 from this graph)")
    out = Path(out)
    if out.suffix != ".onnx":
        raise InputError(f"the output file must end in .onnx, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, artifact = serving_model(artifact_path, form, fused=custom)
    images = validation_images(artifact.preprocess, validation_count)
    with torch.no_grad():
        reference = model(images)
    weight_bytes = sum(tensor.numel() * tensor.element_size()
                       for tensor in [*model.parameters(), *model.buffers()])
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    for stale in (out, out.with_name(out.name + ".data"), sidecar_path(out)):
        stale.unlink(missing_ok=True)  # a failed export must not leave an old graph looking current

    log.info("exporting %s (%s, %s) to %s", artifact.path, form, precision, out)
    if precision == "int8":
        _export_int8(model, out, images[:2], external_data)
    elif custom:
        _torch_export(model, out, images[:2], external_data, custom_attention.translation_table())
    else:
        _torch_export(_HalfPrecision(model) if precision == "fp16" else model, out, images[:2], external_data)
    onnx.checker.check_model(str(out), full_check=True)

    outputs = custom_attention.run_reference(out, images) if custom else run_onnxruntime(out, images, precision)
    result = parity(reference, outputs, artifact.logit_scale)
    check_parity(result, precision, f"the {precision} ONNX graph {out}")
    extra = (out.name + ".data",) if out.with_name(out.name + ".data").exists() else ()
    details = {"opset": OPSET, "form": form, "attention": attention, "logit_scale": artifact.logit_scale,
               "dynamic_batch": True,
               "external_data": bool(extra),
               "validation": result.to_dict(), "export_seconds": round(time.perf_counter() - started, 2),
               "torch_version": torch.__version__, "onnx_version": onnx.__version__}
    sidecar = write_sidecar(out, kind="onnx", source_manifest=artifact.manifest, source_path=str(artifact.path),
                            precision=precision, details=details, extra_files=extra)
    log.info("wrote %s: max |logit diff| %.2e of the logit scale, top-1 agreement %.1f%% on %d images",
             out, result.max_logit_diff, 100 * result.top1_agreement, result.images)
    return sidecar


def _export_int8(model: torch.nn.Module, out: Path, example: torch.Tensor, external_data: bool) -> None:
    """Dynamic int8: MatMul weights quantised ahead of time, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_graph = out.with_name(out.stem + ".fp32-tmp.onnx")
    try:
        _torch_export(model, float_graph, example, external_data=False)
        quantize_dynamic(str(float_graph), str(out), weight_type=QuantType.QInt8,
                         use_external_data_format=external_data)
    finally:
        float_graph.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0],
                                     epilog=console.EPILOG)
    parser.add_argument("artifact", help="purified-model directory (from python -m training.purify)")
    parser.add_argument("--out", required=True, help="output .onnx file; its sidecar is written beside it")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_const", dest="precision", const="fp16",
                           help="float16 weights and activations (float32 inputs and outputs)")
    precision.add_argument("--int8", action="store_const", dest="precision", const="int8",
                           help="dynamic int8 quantisation of the weights")
    parser.add_argument("--literal", action="store_const", dest="form", const="literal", default="folded",
                        help="keep the literal prompt concatenation instead of folding (for comparison)")
    parser.add_argument("--external-data", action="store_true", default=None,
                        help="store the weights in a .data file beside the graph (automatic above 1 GiB)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    export_onnx(args.artifact, args.out, precision=args.precision or "fp32", form=args.form,
                external_data=args.external_data)
    return 0


if __name__ == "__main__":
    sys.exit(console.run(main))
