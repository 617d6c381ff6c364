"""Write a Triton Inference Server model repository for a purified model.

    python -m export.triton PURIFIED --out REPO [--name clip_guard] [--max-batch 64]
                            [--instances 1] [--kind auto|cpu|gpu] [--max-queue-delay-us 2000] [--overwrite]

PURIFIED is an artifact directory (exported to ONNX here, fp32, checked against torch by
export.onnx), an exported `.onnx` graph (any precision), or a TensorRT `.engine`/`.plan`.
The repository:

    REPO/NAME/config.pbtxt       platform, max_batch_size, the input and outputs with names, types and
                                 dims read from the graph, dynamic_batching, instance_group, and the
                                 clip-guard sidecar as the parameter `clip_guard_sidecar` (for guard.client)
    REPO/NAME/labels.txt         the class names, one per line (the logits output's label_filename)
    REPO/NAME/1/model.onnx       the graph (model.plan for an engine), with its clip-guard sidecar
    REPO/NAME/1/model.onnx.json  model.onnx.json: the artifact's checksum, the alert and its calibration,
                                 the export's validation, and the sha256 of model.onnx (guard.load reads
                                 REPO/NAME/1/model.onnx directly, for a local check)

Serve it with `tritonserver --model-repository=REPO` (docs/serving.md); Triton cannot run
on the machines this was developed on, so the repository is checked against Triton's own
ModelConfig protobuf (tests/test_triton.py), not against a running server.

The trigger alert runs client-side: `guard.client.triton(url, NAME)` decodes, resizes and
perturbs the images and scores the alert with the library's code; Triton runs the graph on
the 1 + K rows per image. max_batch_size therefore counts rows: with the default alert
(K = 2) a request of one image is 3 rows, and --max-batch must be at least 1 + K.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from guard import console
from guard.backends import import_tensorrt
from guard.client import TRITON_SIDECAR_PARAMETER
from guard.errors import ArtifactError, InputError
from guard.manifest import Manifest
from guard.runtime import model_kind
from guard.sealed import file_records, write_sealed
from guard.sidecar import CHECKSUM_KEY, read_sidecar, sidecar_path

from .onnx import _import_onnx, export_onnx

log = logging.getLogger(__name__)

VERSION = "1"
LABELS_FILE = "labels.txt"
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# model file, platform, backend per compiled kind (Triton's names)
PLATFORMS = {"onnx": ("model.onnx", "onnxruntime_onnx", "onnxruntime"),
             "tensorrt": ("model.plan", "tensorrt_plan", "tensorrt")}
# ONNX TensorProto element types -> Triton data types (those a clip-guard graph can have)
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16", 6: "TYPE_INT32", 7: "TYPE_INT64",
              2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Tensor:
    """An input or output as config.pbtxt states it: dims without the batch axis."""
    name: str
    data_type: str
    dims: tuple[int, ...]


def onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor], dict]:
    """(inputs, outputs, {"ir_version", "opset"}) of an ONNX graph, read from the graph itself
    (no weights loaded). The first axis must be the dynamic batch axis; other unnamed sizes are -1."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}

    def tensors(values) -> list[Tensor]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type not in ONNX_TYPES:
                raise ArtifactError(f"{path}: {value.name} has ONNX element type {tensor_type.elem_type}, which "
                                    "this exporter does not map to a Triton type")
            dims = tensor_type.shape.dim
            if not dims or dims[0].HasField("dim_value"):
                shape = [d.dim_value or d.dim_param for d in dims]
                raise ArtifactError(f"{path}: {value.name} has no dynamic batch axis (shape {shape}); export it "
                                    "with python -m export.onnx")
            found.append(Tensor(value.name, ONNX_TYPES[tensor_type.elem_type],
                                tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])))
        return found

    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    return tensors(model.graph.input), tensors(model.graph.output), {"ir_version": model.ir_version, "opset": opset}


def engine_io(path: Path) -> tuple[list[Tensor], list[Tensor], dict]:
    """The same for a TensorRT engine, read through TensorRT (needs it, and a GPU to deserialize)."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ArtifactError(f"TensorRT {trt.__version__} cannot deserialize {path}; rebuild it here "
                            "(python -m export.trt)")
    types = {trt.float32: "TYPE_FP32", trt.float16: "TYPE_FP16", trt.int32: "TYPE_INT32", trt.int8: "TYPE_INT8"}
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = tuple(engine.get_tensor_shape(name))
        tensor = Tensor(name, types[engine.get_tensor_dtype(name)], tuple(int(side) for side in shape[1:]))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(tensor)
    return inputs, outputs, {"tensorrt_version": trt.__version__}


def _string(text: str) -> str:
    """A protobuf text-format string literal (JSON given here is ASCII: ensure_ascii)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensors(title: str, tensors: list[Tensor], labels: dict[str, str]) -> list[str]:
    lines = [f"{title} ["]
    for index, tensor in enumerate(tensors):
        lines += ["  {", f"    name: {_string(tensor.name)}", f"    data_type: {tensor.data_type}",
                  f"    dims: [ {', '.join(map(str, tensor.dims))} ]"]
        if tensor.name in labels:
            lines.append(f"    label_filename: {_string(labels[tensor.name])}")
        lines.append("  }" + ("," if index < len(tensors) - 1 else ""))
    return lines + ["]"]


def model_config(name: str, kind: str, inputs: list[Tensor], outputs: list[Tensor], *, max_batch: int,
                 max_queue_delay_us: int, instances: int, instance_kind: str, sidecar: dict, header: str) -> str:
    """config.pbtxt's text (Triton's ModelConfig in protobuf text format)."""
    model_file, platform, backend = PLATFORMS[kind]
    sidecar_json = json.dumps(sidecar, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"name: {_string(name)}", f"platform: {_string(platform)}", f"backend: {_string(backend)}",
              f"default_model_filename: {_string(model_file)}", f"max_batch_size: {max_batch}"]
    lines += _tensors("input", inputs, {})
    lines += _tensors("output", outputs, {"logits": LABELS_FILE})
    lines += ["# requests from all clients are batched together, up to max_batch_size rows",
              "dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
              "instance_group [", "  {", f"    count: {instances}", f"    kind: {KINDS[instance_kind]}", "  }", "]",
              "# the clip-guard sidecar (classes, preprocessing, alert and its calibration, source checksum),",
              "# read by guard.client.triton through Triton's model-configuration API",
              "parameters {", f"  key: {_string(TRITON_SIDECAR_PARAMETER)}",
              f"  value {{ string_value: {_string(sidecar_json)} }}", "}"]
    return "\n".join(lines) + "\n"


def _copy_compiled(source: Path, kind: str, version_dir: Path) -> Path:
    """Copy a compiled model and its sidecar under Triton's file name; the sidecar is re-sealed with
    the new name and checksums and keeps everything else (source checksum, alert, validation)."""
    sidecar = read_sidecar(source, kind)  # verifies the file and the sidecar before anything is copied
    target = version_dir / PLATFORMS[kind][0]
    extra = [name for name in sidecar["files"] if name != source.name]
    if extra:  # ONNX external data: the graph names its data file, so it is rewritten under the new name
        onnx = _import_onnx()
        model = onnx.load(str(source), load_external_data=True)
        onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")
        extra = [target.name + ".data"]
    else:
        shutil.copyfile(source, target)
    document = {key: value for key, value in sidecar.items() if key != CHECKSUM_KEY}
    document.update(file=target.name, files=file_records(version_dir, [target.name, *extra]))
    write_sealed(sidecar_path(target), document, CHECKSUM_KEY)
    return target


def export_triton(model_path: str | Path, out: str | Path, *, name: str = "clip_guard", max_batch: int = 64,
                  max_queue_delay_us: int = 2000, instances: int = 1, instance_kind: str = "auto",
                  overwrite: bool = False) -> Path:
    """Write the model repository entry REPO/NAME for model_path; returns the REPO/NAME directory.
    It is written in a temporary directory and moved into place, so a server watching REPO never
    sees half of it."""
    model_path, repo = Path(model_path), Path(out)
    if not _NAME.fullmatch(name):
        raise InputError(f"--name {name!r}: a Triton model name here is letters, digits, '_', '.' and '-', not "
                         "starting with '.' or '-'")
    for option, value, least in (("--max-batch", max_batch, 1), ("--instances", instances, 1),
                                 ("--max-queue-delay-us", max_queue_delay_us, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{option} must be an integer >= {least}, got {value!r}")
    if instance_kind not in KINDS:
        raise InputError(f"--kind must be one of {tuple(KINDS)}, got {instance_kind!r}")
    if not model_path.exists():
        raise ArtifactError(f"{model_path}: no such artifact directory or compiled model")
    kind = model_kind(model_path)[0]
    if kind == "aoti":
        raise InputError(f"{model_path} is an AOTInductor package, which Triton does not serve; export the artifact "
                         "itself (or its .onnx) instead")
    if kind == "tensorrt" and instance_kind == "cpu":
        raise InputError("a TensorRT engine runs on a GPU: use --kind gpu or auto")
    final = repo / name
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; pass --overwrite to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    # Staged inside REPO (one file system, so the final rename is atomic), under a hidden name.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        version_dir = staging / VERSION
        version_dir.mkdir()
        if kind == "artifact":
            export_onnx(model_path, version_dir / PLATFORMS["onnx"][0])
            target, kind = version_dir / PLATFORMS["onnx"][0], "onnx"
        else:
            target = _copy_compiled(model_path, kind, version_dir)
        sidecar = read_sidecar(target, kind)
        perturbations = Manifest.from_document(sidecar, sidecar_path(target)).alert_config.num_perturbations
        if max_batch < 1 + perturbations:
            raise InputError(f"--max-batch {max_batch} is smaller than the {1 + perturbations} rows one image "
                             f"needs with its alert (1 + {perturbations} perturbations)")
        inputs, outputs, graph = onnx_io(target) if kind == "onnx" else engine_io(target)
        if kind == "tensorrt" and max_batch > int(sidecar["tensorrt"]["profile"]["max"]):
            raise InputError(f"--max-batch {max_batch} exceeds the engine's profile maximum "
                             f"{sidecar['tensorrt']['profile']['max']}")
        classes = [str(label) for label in sidecar["classes"]]
        if any("\n" in label or "\r" in label for label in classes):
            raise InputError("a class name contains a line break, which a labels file cannot hold")
        logits = next((tensor for tensor in outputs if tensor.name == "logits"), None)
        if logits is None or logits.dims != (len(classes),):
            raise ArtifactError(f"{target}'s logits output has dims {logits and logits.dims}, not ({len(classes)},) "
                                "for its classes")
        (staging / LABELS_FILE).write_text("".join(label + "\n" for label in classes))
        header = (f"Written by `python -m export.triton` from {model_path}\n"
                  f"({kind}, {sidecar['precision']}, {', '.join(f'{key} {value}' for key, value in graph.items())}).\n"
                  f"Serve: tritonserver --model-repository={repo.resolve()}")
        (staging / "config.pbtxt").write_text(model_config(
            name, kind, inputs, outputs, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
            instances=instances, instance_kind=instance_kind, sidecar=sidecar, header=header))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s (%s); serve it with: tritonserver --model-repository=%s", final, kind, repo.resolve())
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__.split("\n\n")[0],
                                     epilog=console.EPILOG)
    parser.add_argument("model", metavar="PURIFIED", help="artifact directory, exported .onnx, or TensorRT .engine")
    parser.add_argument("--out", required=True, metavar="REPO", help="the model repository (created if missing)")
    parser.add_argument("--name", default="clip_guard", help="the model's name in the repository (clip_guard)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="Triton's max_batch_size, in rows: 1 + K per image with the alert (64)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long Triton's dynamic batcher waits to fill a batch (2000 microseconds)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per device (1)")
    parser.add_argument("--kind", choices=tuple(KINDS), default="auto",
                        help="instance_group kind: auto (GPU where Triton has one), cpu or gpu")
    parser.add_argument("--overwrite", action="store_true", help="replace REPO/NAME if it exists")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    final = export_triton(args.model, args.out, name=args.name, max_batch=args.max_batch,
                          max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                          instance_kind=args.kind, overwrite=args.overwrite)
    print(f"wrote {final}; serve it with:\n  tritonserver --model-repository={Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(console.run(main))
