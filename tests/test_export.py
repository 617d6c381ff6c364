"""Exports (ONNX fp32/fp16/int8, AOTInductor, TensorRT as far as this machine allows) and
every serving backend against the torch reference, through the public guard.load."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import guard
from conftest import CLASSES, save_image_folder, smooth_images
from export.common import TOLERANCES
from guard import console
from guard.artifact import load_artifact
from guard.backends import check_engine_compatible, rebuild_command
from guard.inputs import prepare_batch
from guard.errors import ArtifactError, ChecksumError, InputError, MissingDependencyError, ModelLoadError
from guard.runtime import build_classifier
from guard.sealed import seal
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


def test_onnx_graph_is_opset_18_with_a_dynamic_batch_and_named_outputs(exports):
    model = onnx.load(str(exports["onnxruntime-fp32"]))
    assert {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}["ai.onnx"] == 18
    (graph_input,) = model.graph.input
    assert graph_input.name == "images"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    assert [output.name for output in model.graph.output] == ["logits", "embedding"]
    sidecar = read_sidecar(exports["onnxruntime-fp32"], "onnx")
    assert sidecar["classes"] == list(CLASSES) and sidecar["onnx"]["form"] == "folded"
    assert sidecar["onnx"]["validation"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("damage", ["graph byte", "sidecar byte", "missing sidecar", "renamed", "future version"])
def test_a_damaged_compiled_model_is_refused(exports, tmp_path, damage):
    source = exports["onnxruntime-fp32"]
    path = tmp_path / source.name
    shutil.copy(source, path)
    shutil.copy(sidecar_path(source), sidecar_path(path))
    expected = ChecksumError
    if damage == "graph byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "sidecar byte":
        text = sidecar_path(path).read_text()
        sidecar_path(path).write_text(text.replace('"fp32"', '"fp16"', 1))
    elif damage == "missing sidecar":
        sidecar_path(path).unlink()
        expected = ArtifactError
    elif damage == "renamed":
        path = path.rename(tmp_path / "other.onnx")
        shutil.move(sidecar_path(tmp_path / source.name), sidecar_path(path))
        expected = ArtifactError
    else:
        sidecar = json.loads(sidecar_path(path).read_text())
        sidecar["format_version"] = 99
        seal(sidecar, "sidecar_sha256")  # consistent, only newer
        sidecar_path(path).write_text(json.dumps(sidecar))
        expected = ArtifactError
    with pytest.raises(expected, match=path.name if damage != "future version" else "upgrade clip-guard"):
        guard.load(path)


def test_backend_and_device_mismatches_are_clear_errors(exports, tmp_path):
    with pytest.raises(InputError, match="cannot run fp32.onnx.*onnxruntime"):
        guard.load(exports["onnxruntime-fp32"], backend="torch")
    with pytest.raises(InputError, match="neither an artifact directory nor a compiled model"):
        guard.load(tmp_path / "model.bin")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="was compiled for cpu, not cuda"):
            guard.load(exports["aoti"], device="cuda")
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ModelLoadError, match="not CUDAExecutionProvider.*onnxruntime-gpu"):
            guard.load(exports["onnxruntime-fp32"], device="cuda")


def test_onnx_export_errors_and_exit_codes(tiny_artifact, tmp_path, capsys):
    with pytest.raises(InputError, match="must end in .onnx"):
        export_onnx(tiny_artifact.path, tmp_path / "model.bin")
    assert console.run(onnx_main, [str(tmp_path / "absent"), "--out", str(tmp_path / "m.onnx")]) == 3
    assert "manifest.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --fp16 and --int8 exclude each other
        onnx_main([str(tiny_artifact.path), "--out", "x.onnx", "--fp16", "--int8"])
    # no runtime here runs a custom-attention graph, so the command line does not offer it (docs/export.md)
    assert console.run(onnx_main, [str(tiny_artifact.path), "--out", "x.onnx", "--custom-attention"]) == 2
    assert "unrecognized arguments: --custom-attention" in capsys.readouterr().err


def test_parity_images_are_the_training_test_set_byte_for_byte():
    """export.parity reads Fashion-MNIST without training/, and gets exactly its test images."""
    from export.images import fashion_mnist_test_images
    from training.data import load_dataset

    assert torch.equal(fashion_mnist_test_images(), load_dataset("fashion-mnist", "test").images)


def test_parity_command_on_a_folder_and_fashion_mnist_and_its_failures(tiny_artifact, exports, tmp_path, capsys):
    from export.parity import main as parity_main

    artifact, compiled = str(tiny_artifact.path), [str(exports["onnxruntime-fp32"]), str(exports["aoti"])]
    report = tmp_path / "parity.json"

    def run(*argv) -> tuple[int, dict]:
        code = console.run(parity_main, [artifact, *argv, "--json", str(report)])
        return code, json.loads(report.read_text()) if code == 0 else {}

    photos = save_image_folder(tmp_path / "photos" / "test" / "any", smooth_images(12, seed=3)).parents[1]
    save_image_folder(tmp_path / "photos" / "train", smooth_images(5, seed=4))  # not read: test/ is
    code, results = run(*compiled, "--data", str(photos))
    assert code == 0, capsys.readouterr().err
    assert set(results) == set(compiled) and {result["images"] for result in results.values()} == {12}
    assert all(result["precision"] == "fp32" and result["top1_agreement"] == 1.0
               and result["max_logit_diff"] <= TOLERANCES["fp32"] for result in results.values())
    code, results = run(compiled[0], "--data", "fashion-mnist", "--limit", "40")
    assert code == 0 and results[compiled[0]]["images"] == 40

    # A graph of other prompts disagrees with this artifact: exit 4, the file named.
    other = tiny_artifact.save(tmp_path / "other", visual_prompts=torch.randn_like(tiny_artifact.visual_prompts))
    export_onnx(other, tmp_path / "other.onnx")
    capsys.readouterr()
    assert console.run(parity_main, [artifact, str(tmp_path / "other.onnx"), "--data", str(photos)]) == 4
    assert "parity failed" in capsys.readouterr().err
    assert console.run(parity_main, [artifact, compiled[0], "--data", "digits"]) == 2
    assert "write their test images to a folder" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("1:32:256", (1, 32, 256)), ("4:4:4", (4, 4, 4))])
def test_batch_profile_parses(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected


@pytest.mark.parametrize("text", ["1:32", "0:1:2", "8:4:16", "a:b:c", ""])
def test_batch_profile_rejects_bad_text(text):
    with pytest.raises(InputError, match="MIN:OPT:MAX|MIN <= OPT <= MAX"):
        BatchProfile.parse(text)


def test_trt_refuses_reduced_precision_graphs_before_needing_tensorrt(exports, tmp_path, capsys):
    code = console.run(trt_main, [str(exports["onnxruntime-fp16"]), "--out", str(tmp_path / "x.engine")])
    assert code == 2 and "build engines from the fp32 export and pass --fp16" in capsys.readouterr().err
    code = console.run(trt_main, [str(exports["onnxruntime-fp32"]), "--out", str(tmp_path / "x.engine"),
                              "--batch", "1:2"])
    assert code == 2 and "MIN:OPT:MAX" in capsys.readouterr().err


@pytest.mark.skipif(tensorrt_usable(), reason="checks the message given where TensorRT cannot run")
def test_trt_without_tensorrt_or_a_gpu_exits_with_a_clear_message(exports, tmp_path, capsys):
    code = console.run(trt_main, [str(exports["onnxruntime-fp32"]), "--out", str(tmp_path / "x.engine")])
    error = capsys.readouterr().err
    assert code == 3 and error.startswith("error: ") and "Traceback" not in error
    assert "TensorRT is not installed" in error or "needs an NVIDIA GPU" in error
    assert not (tmp_path / "x.engine").exists()


def test_engine_compatibility_is_checked_against_version_and_gpu():
    details = {"tensorrt_version": "10.3.0", "compute_capability": [9, 0]}
    check_engine_compatible(details, "10.3.0", (9, 0), "rebuild")
    with pytest.raises(ModelLoadError, match="TensorRT 10.3.0, this machine has 10.7.0: rebuild"):
        check_engine_compatible(details, "10.7.0", (9, 0), "rebuild")
    with pytest.raises(ModelLoadError, match="capability 9.0, this GPU is 8.0: rebuild"):
        check_engine_compatible(details, "10.3.0", (8, 0), "rebuild")


def test_rebuild_command_reproduces_the_build(exports):
    sidecar = {"precision": "fp16", "tensorrt": {"onnx": "m.onnx", "profile": {"min": 1, "opt": 8, "max": 64}}}
    assert rebuild_command(sidecar, Path("m.engine")).endswith(
        "`python -m export.trt m.onnx --out m.engine --fp16 --batch 1:8:64`")


@pytest.mark.skipif(tensorrt_usable(), reason="checks the message given where TensorRT cannot run")
def test_loading_an_engine_without_tensorrt_says_what_to_install(exports, tmp_path):
    # A described engine file: the sidecar is real, the engine bytes are never read without TensorRT.
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    details = {"tensorrt_version": "10.3.0", "compute_capability": [9, 0], "onnx": "m.onnx",
               "profile": {"min": 1, "opt": 8, "max": 64}}
    write_sidecar(engine, kind="tensorrt", source_manifest=read_sidecar(exports["onnxruntime-fp32"], "onnx"),
                  source_path="m.onnx", precision="fp32", details=details)
    with pytest.raises(MissingDependencyError, match="clip-guard\\[tensorrt\\]"):
        guard.load(engine, device="cpu")


# Largest |alert score difference| from the torch backend's, per precision (scores lie in [0, 4]).
ALERT_TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_gives_the_torch_alert_scores(exports, name):
    images = raw_images(6, seed=11)
    with guard.load(exports["torch"], device="cpu") as model:
        expected = model.alert_scores(images)
    precision = name.rsplit("-", 1)[-1] if "-" in name else "fp32"
    with guard.load(exports[name], device="cuda" if name.startswith("tensorrt") else "cpu") as model:
        scores = model.alert_scores(images)
    assert float((scores - expected).abs().max()) <= ALERT_TOLERANCES[precision]


def test_a_calibrated_threshold_carries_over_to_fp32_exports_only(tiny_artifact, tmp_path):
    from guard.alerts import AlertConfig
    from guard.calibration import calibrate, store_alert

    artifact = Path(shutil.copytree(tiny_artifact.path, tmp_path / "purified"))
    store_alert(artifact, AlertConfig(("median:3",), "feature", 0.25), {"fpr": 0.01, "images": 500})
    export_onnx(artifact, tmp_path / "fp32.onnx", precision="fp32")
    export_onnx(artifact, tmp_path / "fp16.onnx", precision="fp16")
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as model:
        assert model.alert_config == AlertConfig(("median:3",), "feature", 0.25)
        assert model.manifest["alert_calibration"] == {"fpr": 0.01, "images": 500}
    with guard.load(tmp_path / "fp16.onnx", device="cpu") as model:
        assert model.alert_config == AlertConfig(("median:3",), "feature", None)  # its scores differ: recalibrate
        assert model.classify(raw_images(1, seed=0)[0]).alert_status == "uncalibrated"
    record = calibrate(tmp_path / "fp16.onnx", raw_images(20, seed=1), fpr=0.05)
    assert record["measured_on"]["precision"] == "fp16"
    with guard.load(tmp_path / "fp16.onnx", device="cpu") as model:  # the re-sealed sidecar verifies
        assert model.alert_config.threshold == record["threshold"]


def test_the_frozen_tower_view_is_served_by_the_artifact_and_refused_by_compiled_models(tiny_artifact, tmp_path):
    from guard.alerts import AlertConfig
    from guard.calibration import store_alert

    with_tower = AlertConfig(("open:3", "median:3", "frozen"), "pr_terms", 0.1)
    artifact = Path(shutil.copytree(tiny_artifact.path, tmp_path / "purified"))
    store_alert(artifact, with_tower, {"fpr": 0.01, "images": 500})
    images = raw_images(3, seed=4)
    with guard.load(artifact, device="cpu") as model:
        assert model.alert_config == with_tower and len(model.classify(images)) == 3
    export_onnx(artifact, tmp_path / "fp32.onnx", precision="fp32")
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as model:
        assert model.alert_config == AlertConfig()  # not carried over: the uncalibrated default
        with pytest.raises(InputError, match="need the artifact directory on the torch backend"):
            model.alert_scores(images, config=with_tower)
    store_alert(tmp_path / "fp32.onnx", with_tower, None)  # recorded anyway: refused at load, with the way out
    with pytest.raises(ArtifactError, match="recalibrate without it"):
        guard.load(tmp_path / "fp32.onnx", device="cpu")


def test_onnxruntime_without_spinning_workers_gives_the_same_outputs(exports):
    from guard.backends import OnnxRuntimeBackend

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    default = OnnxRuntimeBackend(exports["onnxruntime-fp32"], torch.device("cpu"))
    quiet = OnnxRuntimeBackend(exports["onnxruntime-fp32"], torch.device("cpu"), spinning=False)
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for expected, got in zip(default.run(images), quiet.run(images)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
