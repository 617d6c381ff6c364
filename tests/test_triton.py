"""export.triton's model repository, checked against Triton's own ModelConfig protobuf (from the
tritonclient package) and the ONNX graph it serves; and guard.client's Triton side as far as it
runs without a server (none can be installed here): the config it reads, the requests it builds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_images
from test_export import tensorrt_usable

import guard
from export.onnx import export_onnx
from export.triton import export_triton, main
from guard import console
from guard.artifact import read_manifest
from guard.calibration import calibrate
from guard.client import TRITON_SIDECAR_PARAMETER, TritonBackend, sidecar_from_triton_config, triton_from_config
from guard.errors import InputError
from guard.sidecar import read_sidecar, sidecar_path

onnx = pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (the serve extra) is not installed")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.utils import triton_to_np_dtype  # noqa: E402

# ONNX element type -> Triton data type, written out here independently of export.triton
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory) -> Path:
    path = Path(shutil.copytree(tiny_artifact.path, tmp_path_factory.mktemp("calibrated") / "purified"))
    calibrate(path, list(smooth_images(100, seed=1)), fpr=0.05, device="cpu")
    return path


@pytest.fixture(scope="module")
def repository(calibrated, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_triton(calibrated, repo, name="guarded", max_batch=48, max_queue_delay_us=500, instances=2,
                  instance_kind="cpu")
    return repo


def parse_config(model_dir: Path):
    """config.pbtxt as Triton reads it: its ModelConfig message (unknown fields are an error)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def graph_io(path: Path) -> tuple[list, list]:
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [(value.name, ONNX_TO_TRITON[value.type.tensor_type.elem_type],
                 [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]) for value in values]
    return describe(model.graph.input), describe(model.graph.output)


def test_the_repository_layout(repository):
    model_dir = repository / "guarded"
    assert sorted(str(path.relative_to(repository)) for path in repository.rglob("*")) == [
        "guarded", "guarded/1", "guarded/1/model.onnx", "guarded/1/model.onnx.json", "guarded/config.pbtxt",
        "guarded/labels.txt"]
    assert "tritonserver --model-repository=" in (model_dir / "config.pbtxt").read_text()


def test_config_pbtxt_parses_as_triton_model_config_and_matches_the_graph(repository, calibrated):
    model_dir = repository / "guarded"
    config = parse_config(model_dir)
    inputs, outputs = graph_io(model_dir / "1" / "model.onnx")
    assert config.name == "guarded"
    assert (config.platform, config.backend, config.default_model_filename) == \
        ("onnxruntime_onnx", "onnxruntime", "model.onnx")
    assert config.max_batch_size == 48
    # each tensor: the graph's name and type, and its dims after the dynamic batch axis
    for declared, (name, data_type, dims) in zip([*config.input, *config.output], [*inputs, *outputs]):
        assert declared.name == name
        assert model_config_pb2.DataType.Name(declared.data_type) == data_type
        assert isinstance(dims[0], str) and list(declared.dims) == dims[1:]
    assert len(config.input) == len(inputs) == 1 and len(config.output) == len(outputs) == 2
    assert [tensor.name for tensor in config.output] == ["logits", "embedding"]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = config.instance_group
    assert (group.count, model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (2, "KIND_CPU")
    # the labels file holds the classes in logit order
    classes = read_manifest(calibrated)["classes"]
    assert config.output[0].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == list(classes)
    assert list(config.output[0].dims) == [len(classes)]


def test_the_sidecar_records_the_artifact_checksum_and_calibration(repository, calibrated):
    manifest = read_manifest(calibrated)
    model_file = repository / "guarded" / "1" / "model.onnx"
    sidecar = read_sidecar(model_file, "onnx")  # its own checksum and the graph's sha256 verify
    assert sidecar["source"]["sha256"] == manifest["manifest_sha256"]
    assert sidecar["alert"] == manifest["alert"] and sidecar["alert"]["threshold"] is not None
    assert sidecar["alert_calibration"] == manifest["alert_calibration"]
    # and config.pbtxt carries the same sidecar for the client
    config = json_format.MessageToDict(parse_config(repository / "guarded"), preserving_proto_field_name=True)
    assert sidecar_from_triton_config(config) == json.loads(sidecar_path(model_file).read_text())


def test_the_served_graph_classifies_as_the_artifact(repository, calibrated):
    odd_size = torch.rand(3, 30, 44, generator=torch.Generator().manual_seed(3))
    images = list(smooth_images(6, seed=4, side=40)) + [odd_size]
    with guard.load(calibrated, device="cpu") as artifact, \
            guard.load(repository / "guarded" / "1" / "model.onnx", device="cpu") as served:
        expected, got = artifact.classify(images), served.classify(images)
    assert [result.label for result in got] == [result.label for result in expected]
    assert [result.alert for result in got] == [result.alert for result in expected]
    for mine, theirs in zip(got, expected):
        assert mine.probs == pytest.approx(theirs.probs, abs=1e-5)
        assert mine.alert_score == pytest.approx(theirs.alert_score, abs=1e-5)


def test_the_triton_client_reads_the_config_and_builds_requests_triton_accepts(repository):
    """The Guard guard.client.triton builds from this config (no server: gRPC channels connect on
    first use, and nothing is sent here): same classes, preprocessing and alert as the graph's
    sidecar, and request tensors that fit the config's input."""
    model_dir = repository / "guarded"
    message = parse_config(model_dir)
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    remote = triton_from_config("127.0.0.1:8001", "guarded", config)
    with guard.load(model_dir / "1" / "model.onnx", device="cpu") as local:
        assert (remote.classes, remote.preprocess, remote.alert_config) == \
            (local.classes, local.preprocess, local.alert_config)
    backend = remote._backend
    assert isinstance(backend, TritonBackend) and backend.max_batch == message.max_batch_size
    rows = torch.randn(5, 3, 32, 32)
    [tensor] = backend.inputs(rows)
    declared = message.input[0]
    assert tensor.name() == declared.name
    assert np.dtype(triton_to_np_dtype(tensor.datatype())) == np.float32
    assert model_config_pb2.DataType.Name(declared.data_type) == "TYPE_" + tensor.datatype()
    assert tensor.shape() == [5, *declared.dims]
    remote.close()


def test_a_config_without_the_sidecar_is_refused(repository):
    config = json_format.MessageToDict(parse_config(repository / "guarded"), preserving_proto_field_name=True)
    del config["parameters"][TRITON_SIDECAR_PARAMETER]
    with pytest.raises(InputError, match="not written by `python -m export.triton`"):
        sidecar_from_triton_config(config)


@pytest.mark.parametrize("external_data", [False, True])
def test_an_exported_onnx_graph_is_copied_with_its_sidecar_renamed(calibrated, tmp_path, external_data):
    source = tmp_path / "fp16.onnx"
    export_onnx(calibrated, source, precision="fp16", external_data=external_data)
    final = export_triton(source, tmp_path / "repo", max_batch=8)
    copied = final / "1" / "model.onnx"
    assert copied.with_name("model.onnx.data").exists() == external_data
    sidecar = read_sidecar(copied, "onnx")  # renamed files verify
    original = read_sidecar(source, "onnx")
    assert sidecar["precision"] == "fp16" and sidecar["source"] == original["source"]
    assert sidecar["alert"]["threshold"] is None  # fp16 starts uncalibrated, as export.onnx decided
    images = list(smooth_images(4, seed=5))
    with guard.load(source, device="cpu") as first, guard.load(copied, device="cpu") as second:
        assert second.classify(images) == first.classify(images)  # the same graph, exactly


def test_export_refusals_and_exit_codes(calibrated, tmp_path, capsys):
    def run(*argv) -> tuple[int, str]:
        code = console.run(main, [str(arg) for arg in argv])
        return code, capsys.readouterr().err

    existing = tmp_path / "r0"
    (existing / "guarded").mkdir(parents=True)
    code, err = run(calibrated, "--out", existing, "--name", "guarded")
    assert code == 2 and "already exists; pass --overwrite" in err
    code, err = run(calibrated, "--out", tmp_path / "r1", "--max-batch", "2")
    assert code == 2 and "smaller than the 3 rows one image needs" in err
    code, err = run(calibrated, "--out", tmp_path / "r2", "--name", "../up")
    assert code == 2 and "a Triton model name" in err
    code, err = run(tmp_path / "missing", "--out", tmp_path / "r3")
    assert code == 3 and "no such artifact" in err
    assert not (tmp_path / "r1" / "clip_guard").exists()
    assert [path.name for path in (tmp_path / "r1").iterdir()] == []  # no staging directory left behind
    code, _ = run(calibrated, "--out", existing, "--name", "guarded", "--overwrite", "--max-batch", "12")
    assert code == 0 and parse_config(existing / "guarded").max_batch_size == 12


@pytest.mark.skipif(not tensorrt_usable(), reason="building an engine needs TensorRT and a GPU")
def test_an_engine_becomes_a_tensorrt_plan(calibrated, tmp_path):
    from export.trt import BatchProfile, build_engine

    export_onnx(calibrated, tmp_path / "model.onnx")
    build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", profile=BatchProfile(1, 8, 16))
    final = export_triton(tmp_path / "model.engine", tmp_path / "repo", max_batch=16)
    config = parse_config(final)
    assert (config.platform, config.default_model_filename) == ("tensorrt_plan", "model.plan")
    inputs, outputs = graph_io(tmp_path / "model.onnx")
    assert [(t.name, list(t.dims)) for t in [*config.input, *config.output]] == \
        [(name, dims[1:]) for name, _, dims in [*inputs, *outputs]]
    read_sidecar(final / "1" / "model.plan", "tensorrt")
