"""Exports (ONNX fp32/fp16/int8, AOTInductor, TensorRT as far as this machine allows) and
every serving backend against the torch reference, through the public guard.load."""
import json
import shutil

import pytest
import torch

import guard
from export.common import TOLERANCES, validation_images
from guard.artifact import load_artifact
from guard.backends import check_engine_compatible
from guard.inputs import prepare_batch
from guard.errors import ArtifactError, ChecksumError, InputError, MissingDependencyError, ModelLoadError
from guard.runtime import build_classifier
from guard.sidecar import read_sidecar, sidecar_path, write_sidecar

onnx = pytest.importorskip("onnx", reason="the onnxruntime extra is not installed")
from export.aoti import export_aoti  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from export.onnx import main as onnx_main  # noqa: E402
from export.trt import BatchProfile  # noqa: E402
from export.trt import main as trt_main  # noqa: E402


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def exports(tiny_artifact, tmp_path_factory):
    """Every compiled form of the tiny artifact this machine can build, by name."""
    out = tmp_path_factory.mktemp("exports")
    paths = {"torch": tiny_artifact.path}
    for precision in ("fp32", "fp16", "int8"):
        export_onnx(tiny_artifact.path, out / f"{precision}.onnx", precision=precision)
        paths[f"onnxruntime-{precision}"] = out / f"{precision}.onnx"
    export_aoti(tiny_artifact.path, out / "tiny.pt2", max_batch=8)
    paths["aoti"] = out / "tiny.pt2"
    if tensorrt_usable():
        from export.trt import build_engine
        for precision in ("fp32", "fp16"):
            build_engine(paths["onnxruntime-fp32"], out / f"{precision}.engine", fp16=precision == "fp16",
                         profile=BatchProfile(1, 8, 16))
            paths[f"tensorrt-{precision}"] = out / f"{precision}.engine"
    return paths


BACKENDS = ["torch", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "aoti",
            pytest.param("tensorrt-fp32", marks=pytest.mark.skipif(not tensorrt_usable(), reason="no TensorRT/GPU")),
            pytest.param("tensorrt-fp16", marks=pytest.mark.skipif(not tensorrt_usable(), reason="no TensorRT/GPU"))]


@pytest.fixture(scope="module")
def reference(tiny_artifact):
    """The literal (prompt-concatenation) torch model the artifact was trained as."""
    return build_classifier(load_artifact(tiny_artifact.path), "cpu")


def raw_images(count: int, seed: int) -> list[torch.Tensor]:
    """Smooth random CHW pictures in [0, 1], as a caller would hand them to classify."""
    pixels = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return list(torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_every_backend_matches_the_literal_torch_reference(exports, reference, tiny_artifact, name, batch):
    precision = name.rsplit("-", 1)[-1] if "-" in name else "fp32"
    images = raw_images(batch, seed=batch)
    with torch.no_grad():
        expected = reference(prepare_batch(images, tiny_artifact.preprocess, torch.device("cpu")))[0]
    device = "cuda" if name.startswith("tensorrt") else "cpu"
    with guard.load(exports[name], device=device) as model:
        assert model.backend == name.split("-")[0]
        logits = model.logits(images)  # 20 images exceed the aoti package's max batch of 8: it chunks
        results = model.classify(images)
    assert logits.shape == expected.shape
    assert float((logits - expected).abs().max()) / tiny_artifact.logit_scale <= TOLERANCES[precision]
    if precision == "fp32":
        assert [result.index for result in results] == expected.argmax(-1).tolist()
