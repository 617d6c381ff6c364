"""`python -m guard`: classify, inspect and doctor, run in-process through main(argv) and
once through a subprocess; results on stdout, one error line on stderr, documented exit
codes (0 success, 2 usage or input error, 3 artifact or model error, 1 unexpected)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image

import guard
from guard import cli
from guard.errors import (
    ArtifactError,
    ChecksumError,
    ClosedError,
    DataError,
    ExportError,
    InputError,
    MissingDependencyError,
    ModelLoadError,
)

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 6 * index, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- classify -----------------------------------------------------------------------------

def test_classify_prints_one_line_per_image(capsys, tiny_artifact, images):
    code, out, err = run(capsys, "classify", *images, "--model", tiny_artifact.path)
    assert code == 0 and err == ""
    with guard.load(tiny_artifact.path, device="cpu") as model:
        expected = model.classify([str(path) for path in images])
    lines = out.splitlines()
    assert len(lines) == len(images)
    for line, path, result in zip(lines, images, expected):
        name, label, prob, status, alert_score = line.split("\t")
        assert (name, label, status) == (str(path), result.label, "uncalibrated")
        assert float(prob) == pytest.approx(result.score, abs=1e-4)
        assert float(alert_score) == pytest.approx(result.alert_score, abs=1e-4)
    code, out, _ = run(capsys, "classify", *images, "--model", tiny_artifact.path, "--no-alerts")
    assert code == 0 and [len(line.split("\t")) for line in out.splitlines()] == [3] * len(images)


def test_classify_json_with_top_k(capsys, tiny_artifact, images):
    code, out, err = run(capsys, "classify", *images, "--model", tiny_artifact.path, "--json", "--top-k", "3")
    assert code == 0 and err == ""
    records = json.loads(out)
    with guard.load(tiny_artifact.path, device="cpu") as model:
        expected = model.classify([str(path) for path in images])
    assert [record["input"] for record in records] == [str(path) for path in images]
    for record, result in zip(records, expected):
        assert record["label"] == result.label and record["index"] == result.index
        assert list(record["probs"]) == list(CLASSES)
        np.testing.assert_allclose(list(record["probs"].values()), result.probs, atol=1e-6)
        assert [pair["label"] for pair in record["top_k"]] == [label for label, _ in result.top_k(3)]
        probs = [pair["prob"] for pair in record["top_k"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 3


def test_classify_text_with_top_k_alternates_labels_and_probabilities(capsys, tiny_artifact, images):
    code, out, _ = run(capsys, "classify", images[0], "--model", tiny_artifact.path, "--top-k", "10")
    fields = out.rstrip("\n").split("\t")
    assert code == 0 and len(fields) == 1 + 2 * len(CLASSES) + 2  # K larger than the classes: all of them
    assert sorted(fields[1:-2:2]) == sorted(CLASSES) and fields[-2] == "uncalibrated"
    assert sum(float(prob) for prob in fields[2:-2:2]) == pytest.approx(1.0, abs=1e-3)


def test_a_bad_image_is_reported_and_the_others_still_classified(capsys, tiny_artifact, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, out, err = run(capsys, "classify", images[0], broken, images[1], "--model", tiny_artifact.path)
    assert code == 2
    assert "broken.png" in one_error_line(err) and "is not an image" in err
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(images[0]), str(images[1])]

    code, out, err = run(capsys, "classify", images[0], broken, "--model", tiny_artifact.path, "--json")
    records = json.loads(out)
    assert code == 2 and "broken.png" in one_error_line(err)
    assert "label" in records[0] and set(records[1]) == {"input", "error"} and "broken.png" in records[1]["error"]


def test_batches_give_the_single_results(capsys, tiny_artifact, images):
    _, whole, _ = run(capsys, "classify", *images, "--model", tiny_artifact.path, "--json")
    _, one_by_one, _ = run(capsys, "classify", *images, "--model", tiny_artifact.path, "--json", "--batch-size", "1")
    for batched, single in zip(json.loads(whole), json.loads(one_by_one)):
        assert batched["label"] == single["label"]
        np.testing.assert_allclose(list(batched["probs"].values()), list(single["probs"].values()), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nonsense"], "backend must be"),
    (["--device", "no-such-device"], "not a torch device"),
])
def test_usage_errors_found_by_guard_load_exit_2(capsys, tiny_artifact, images, argv, message):
    code, out, err = run(capsys, "classify", images[0], "--model", tiny_artifact.path, *argv)
    assert code == 2 and out == "" and message in one_error_line(err)


def test_a_cuda_device_without_cuda_is_a_usage_error(capsys, tiny_artifact, images):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "classify", images[0], "--model", tiny_artifact.path, "--device", "cuda")
    assert code == 2 and "no CUDA device" in one_error_line(err)


def test_model_errors_exit_3(capsys, artifact_copy, images, tmp_path):
    code, out, err = run(capsys, "classify", images[0], "--model", tmp_path / "nowhere")
    assert code == 3 and out == "" and "nowhere" in one_error_line(err)

    data = bytearray((artifact_copy / "visual.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (artifact_copy / "visual.safetensors").write_bytes(bytes(data))
    code, out, err = run(capsys, "classify", images[0], "--model", artifact_copy)
    assert code == 3 and out == "" and "visual.safetensors does not match its sha256" in one_error_line(err)


@pytest.mark.parametrize("argv", [
    [], ["classify"], ["classify", "x.png"], ["classify", "x.png", "--model", "m", "--top-k", "0"],
    ["classify", "x.png", "--model", "m", "--batch-size", "many"], ["no-such-command"], ["inspect"],
])
def test_argument_errors_exit_2_with_usage(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "usage:" in err and "Traceback" not in err


def test_help_and_version_exit_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in ("classify", "inspect", "doctor", "exit codes"))
    code, out, _ = run(capsys, "--version")
    assert code == 0 and guard.__version__ in out


# --- inspect ------------------------------------------------------------------------------

def test_inspect_json_summarises_and_verifies(capsys, tiny_artifact):
    code, out, err = run(capsys, "inspect", tiny_artifact.path, "--json")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["format"] == "clip-guard/purified" and summary["format_version"] == 1
    assert summary["base_model"] == tiny_artifact.base_model
    assert summary["classes"] == list(CLASSES)
    assert summary["method"] == "rvpt" and summary["hyperparameters"] == {"epochs": 2, "lr": 0.01}
    assert summary["metrics"] == {"clean_accuracy": 0.75, "asr": 0.05}
    assert summary["visual_prompts"]["start_block"] == 1
    names = sorted(entry["name"] for entry in summary["files"])
    assert names == ["class_embeddings.safetensors", "prompts.safetensors", "visual.safetensors"]
    for entry in summary["files"]:
        file = tiny_artifact.path / entry["name"]
        assert entry["bytes"] == entry["actual_bytes"] == file.stat().st_size
        assert entry["sha256"] == entry["actual_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert entry["verified"] is True and entry["problem"] is None


def test_inspect_text(capsys, tiny_artifact):
    code, out, _ = run(capsys, "inspect", tiny_artifact.path)
    assert code == 0
    assert "clip-guard/purified version 1" in out and ", ".join(CLASSES) in out
    assert "  lr" in out and "clean_accuracy" in out
    assert out.count("  ok") == 3


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_inspect_reports_files_that_do_not_verify(capsys, artifact_copy, damage):
    target = artifact_copy / "prompts.safetensors"
    if damage == "flipped":
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    code, out, err = run(capsys, "inspect", artifact_copy, "--json")
    assert code == 3
    entries = {entry["name"]: entry for entry in json.loads(out)["files"]}
    assert entries["prompts.safetensors"]["verified"] is False
    assert entries["prompts.safetensors"]["problem"] == ("sha256 differs" if damage == "flipped" else "missing")
    assert entries["visual.safetensors"]["verified"] and entries["class_embeddings.safetensors"]["verified"]
    assert "prompts.safetensors" in one_error_line(err)
    code, out, _ = run(capsys, "inspect", artifact_copy)
    assert code == 3 and "DOES NOT VERIFY" in out


def test_inspect_refuses_a_damaged_manifest_or_a_newer_format(capsys, artifact_copy, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path / "nowhere")
    assert code == 3 and out == "" and "manifest.json is missing" in one_error_line(err)

    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                                 .encode()).hexdigest()
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "inspect", artifact_copy)
    assert code == 3 and out == "" and "upgrade clip-guard" in one_error_line(err)

    # Back to version 1 but another class list, under the version-2 checksum: the checksum catches it.
    (artifact_copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "classes": ["x"]}))
    code, _, err = run(capsys, "inspect", artifact_copy)
    assert code == 3 and "manifest.json was modified" in one_error_line(err)


# --- doctor -------------------------------------------------------------------------------

def test_doctor_json(capsys):
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["clip_guard"] == guard.__version__
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["packages"]["torch"] and report["packages"]["numpy"] and report["packages"]["pillow"]
    assert set(report["packages"]) >= {"open_clip_torch", "onnx", "onnxruntime", "tensorrt"}
    assert report["torch"]["version"] == torch.__version__
    assert report["cuda"]["available"] == torch.cuda.is_available()
    backends = report["backends"]
    assert backends["torch"]["usable"] is True
    assert backends["onnxruntime"]["usable"] == report["onnxruntime"]["importable"]
    if report["onnxruntime"]["importable"]:
        assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert backends["tensorrt"]["usable"] == (report["tensorrt"]["importable"] and report["cuda"]["available"])
    assert "cpp_ext" in report


def test_doctor_text(capsys):
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert "backend torch" in out and "usable" in out and "custom kernels" in out and "numpy" in out


def fake_cpp_ext(monkeypatch, status=None):
    module = types.ModuleType("cpp_ext")
    if status is not None:
        module.status = status
    monkeypatch.setitem(sys.modules, "cpp_ext", module)


def test_doctor_asks_the_custom_kernels_without_building(capsys, monkeypatch):
    calls = []

    def status(build=True):
        calls.append(build)
        return {"available": True, "kernels": ["cpu"], "attempted": True}

    fake_cpp_ext(monkeypatch, status)
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0 and calls == [False]
    assert json.loads(out)["cpp_ext"] == {"importable": True, "status": {"available": True, "kernels": ["cpu"],
                                                                         "attempted": True}}


@pytest.mark.parametrize("kind, why", [
    ("missing", "not importable"),
    ("no status", "has no status() function"),
    ("status builds", "not called, so nothing is built"),
    ("status fails", "failed (RuntimeError: no compiler)"),
])
def test_doctor_survives_any_custom_kernel_package(capsys, monkeypatch, kind, why):
    if kind == "missing":
        monkeypatch.setitem(sys.modules, "cpp_ext", None)  # import raises ImportError
    elif kind == "no status":
        fake_cpp_ext(monkeypatch)
    elif kind == "status builds":
        fake_cpp_ext(monkeypatch, lambda: pytest.fail("doctor called a status() that cannot skip building"))
    else:
        def status(build=True):
            raise RuntimeError("no compiler")
        fake_cpp_ext(monkeypatch, status)
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0 and why in json.loads(out)["cpp_ext"]["why"]
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and why in out


# --- exit codes and errors ----------------------------------------------------------------

# guard.console's one table: a missing optional package is a model error (3), an export error 4.
@pytest.mark.parametrize("error, code", [
    (InputError("x"), 2), (DataError("x"), 2), (ClosedError("x"), 2), (MissingDependencyError("x"), 3),
    (ArtifactError("x"), 3), (ChecksumError("x"), 3), (ModelLoadError("x"), 3), (ExportError("x"), 4),
    (RuntimeError("x"), 1), (KeyError("x"), 1),
])
def test_exit_codes(error, code, capsys, monkeypatch):
    from guard import console

    assert console.exit_code(error) == code

    def raises():
        raise error
    monkeypatch.setattr("guard.doctor.report", raises)  # the code reaches the command line
    assert cli.main(["doctor"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")  # after a bug's traceback


def test_an_unexpected_error_prints_its_traceback_then_one_line_and_exit_1(capsys, monkeypatch):
    def broken():
        raise RuntimeError("something\nspanning lines")

    monkeypatch.setattr("guard.doctor.report", broken)
    code, out, err = run(capsys, "doctor")
    assert code == 1 and out == ""
    assert err.startswith("Traceback") and "in broken" in err  # a bug: the report needs where it happened
    last = err.strip().splitlines()[-1]
    assert last == "error: unexpected RuntimeError: something spanning lines (a bug in clip-guard or its dependencies)"


def test_a_typed_error_from_any_command_keeps_its_code(capsys, monkeypatch):
    def refuses():
        raise MissingDependencyError("onnxruntime is needed; pip install onnxruntime")

    monkeypatch.setattr("guard.doctor.report", refuses)
    code, _, err = run(capsys, "doctor")
    assert code == 3 and one_error_line(err) == "error: onnxruntime is needed; pip install onnxruntime"


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("guard.doctor.report", interrupted)
    assert run(capsys, "doctor")[0] == 130


def test_a_new_subcommand_is_one_function_and_one_parser_entry(capsys, monkeypatch):
    def run_hello(args) -> int:
        cli.emit(f"hello {args.name}")
        if args.name == "bad":
            raise InputError("bad name")
        return 0

    def add_hello(commands) -> None:
        parser = cli._subparser(commands, "hello", "say hello")
        parser.add_argument("name")
        parser.set_defaults(run=run_hello)

    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [add_hello])
    assert run(capsys, "hello", "world") == (0, "hello world\n", "")
    code, _, err = run(capsys, "hello", "bad")
    assert code == 2 and one_error_line(err) == "error: bad name"


def test_python_dash_m_guard_in_a_subprocess(tmp_path):
    doctor = subprocess.run([sys.executable, "-m", "guard", "doctor", "--json"], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stderr
    assert json.loads(doctor.stdout)["clip_guard"] == guard.__version__

    # A failing command: its exit code reaches the shell, with one line and no traceback.
    missing = subprocess.run([sys.executable, "-m", "guard", "inspect", str(tmp_path / "nowhere")], cwd=ROOT,
                             check=False, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and missing.stdout == ""
    assert "manifest.json is missing" in one_error_line(missing.stderr)
