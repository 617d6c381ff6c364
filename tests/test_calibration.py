"""Trigger alerts in Guard.classify and their calibration: the score is the one guard.alerts
computes from the same forward rows, it runs in one backend call per batch, uncalibrated
models say so, `calibrate` stores a threshold that loads back and alerts at the rate it
was set for, and bad calibration input writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import guard
from guard import cli
from guard.alerts import AlertConfig, alert_scores, expand_batch
from guard.artifact import MANIFEST
from guard.calibration import calibrate, store_alert
from guard.errors import ArtifactError, ChecksumError, InputError
from guard.inputs import resize_batch
from guard.runtime import ALERT_CLEAR, ALERT_OFF, ALERT_RAISED, ALERT_UNCALIBRATED

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clean_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=generator) for _ in range(count)]


def test_uncalibrated_results_say_so_and_alerts_can_be_switched_off(model):
    images = clean_images(3)
    results = model.classify(images)
    for result in results:
        assert result.alert_status == ALERT_UNCALIBRATED
        assert result.threshold is None and result.alert is None
        assert isinstance(result.alert_score, float) and result.alert_score >= 0.0
    for result in model.classify(images, alerts=False):
        assert (result.alert_score, result.threshold, result.alert, result.alert_status) == (None, None, None,
                                                                                             ALERT_OFF)
    assert model.classify(images[0]).alert_status == ALERT_UNCALIBRATED


def test_the_score_is_guard_alerts_on_the_same_rows_and_the_labels_do_not_change(model):
    images = clean_images(5, seed=1)
    resized = resize_batch(images, model.preprocess)
    config = model.alert_config
    expanded = model.preprocess.normalize(expand_batch(resized, config))
    logits, embedding = model.forward(expanded)
    expected = alert_scores(logits, embedding, len(images), config)
    results = model.classify(images)
    np.testing.assert_allclose([r.alert_score for r in results], expected.numpy(), rtol=1e-5, atol=1e-6)
    plain = model.classify(images, alerts=False)
    assert [r.index for r in results] == [r.index for r in plain]
    np.testing.assert_allclose([r.probs for r in results], [r.probs for r in plain], atol=1e-5)


def test_alerts_cost_one_backend_call_per_batch(model, monkeypatch):
    rows = []
    original = model._backend.run
    monkeypatch.setattr(model._backend, "run",  # Backend.run's one signature
                        lambda images, *args: rows.append(len(images)) or original(images, *args))
    k = model.alert_config.num_perturbations
    model.classify(clean_images(7), batch_size=4)
    assert rows == [4 * (1 + k), 3 * (1 + k)]
    rows.clear()
    model.classify(clean_images(7), batch_size=4, alerts=False)
    assert rows == [4, 3]


def test_calibrate_stores_a_threshold_that_loads_back_and_alerts_at_its_rate(artifact_copy):
    images = clean_images(200, seed=2)
    before = guard.load(artifact_copy, device="cpu")
    scores = before.alert_scores(images)
    before.close()
    progress = []
    record = calibrate(artifact_copy, images, fpr=0.05, data="random test images",
                       progress=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (200, 200) and len(progress) == 4  # batches of 64
    assert record["threshold"] == pytest.approx(torch.quantile(scores.double(), 0.95).item(), rel=1e-5)
    assert record["images"] == 200 and record["fpr"] == 0.05 and record["data"] == "random test images"
    assert record["clean_alert_rate"] <= 0.05
    assert record["scores"]["min"] <= record["scores"]["median"] <= record["scores"]["p95"] <= record["scores"]["max"]
    assert record["measured_on"]["backend"] == "torch"

    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    assert manifest["alert"] == {"perturbations": ["open:3", "median:3"], "statistic": "pr_terms",
                                 "threshold": record["threshold"]}
    assert manifest["alert_calibration"] == record
    with guard.load(artifact_copy, device="cpu") as model:  # the re-sealed manifest verifies
        assert model.alert_config.threshold == record["threshold"]
        results = model.classify(images)
    alerts = [r.alert for r in results]
    assert {r.alert_status for r in results} <= {ALERT_CLEAR, ALERT_RAISED}
    assert alerts == [r.alert_score > record["threshold"] for r in results]
    assert [r.alert_status == ALERT_RAISED for r in results] == alerts
    assert 0 < sum(alerts) <= 10  # 5 % of 200


def test_calibrate_with_another_config_stores_it(artifact_copy):
    config = AlertConfig(("median:3",), "feature")
    record = calibrate(artifact_copy, clean_images(100), fpr=0.1, config=config)
    with guard.load(artifact_copy, device="cpu") as model:
        assert model.alert_config == AlertConfig(("median:3",), "feature", record["threshold"])


@pytest.mark.parametrize("images, fpr, message", [
    (clean_images(50), 0.01, "at least 100 clean images"),
    (clean_images(120), 0.0, "fpr must lie in"),
    (clean_images(120), 1.5, "fpr must lie in"),
    (clean_images(70) + [torch.full((3, 32, 32), float("nan"))] + clean_images(50), 0.05, "input 70"),
    (clean_images(40) + ["no-such-file.png"], 0.05, "input 40: .*no-such-file.png"),
])
def test_bad_calibration_input_is_an_input_error_and_writes_nothing(artifact_copy, images, fpr, message):
    before = (artifact_copy / MANIFEST).read_bytes()
    with pytest.raises(InputError, match=message):
        calibrate(artifact_copy, images, fpr=fpr)
    assert (artifact_copy / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in artifact_copy.iterdir()) == sorted(
        ["manifest.json", "visual.safetensors", "prompts.safetensors", "class_embeddings.safetensors"])


def test_a_damaged_artifact_is_not_calibrated(artifact_copy):
    manifest = artifact_copy / MANIFEST
    manifest.write_text(manifest.read_text().replace('"rvpt"', '"RVPT"'))
    before = manifest.read_bytes()
    with pytest.raises(ChecksumError):
        store_alert(artifact_copy, AlertConfig(threshold=0.5), None)
    with pytest.raises(ChecksumError):
        calibrate(artifact_copy, clean_images(100), fpr=0.05)
    assert manifest.read_bytes() == before


def test_a_stored_alert_that_does_not_parse_is_an_artifact_error(artifact_copy):
    from guard.artifact import CHECKSUM_KEY, read_manifest
    from guard.sealed import write_sealed

    manifest = read_manifest(artifact_copy)
    manifest["alert"] = {"perturbations": ["twirl:3"], "statistic": "pr_terms", "threshold": 0.1}
    write_sealed(artifact_copy / MANIFEST, manifest, CHECKSUM_KEY)
    with pytest.raises(ArtifactError, match="alert entry"):
        guard.load(artifact_copy, device="cpu")


# --- the command line ---------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    for index in range(110):
        folder = tmp_path / "clean" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (tmp_path / "clean" / "notes.txt").write_text("not an image, and not picked up")
    return tmp_path / "clean"


def test_cli_calibrate_then_classify_and_inspect(capsys, artifact_copy, image_folder):
    code = cli.main(["inspect", str(artifact_copy)])
    assert code == 0 and "NOT CALIBRATED" in capsys.readouterr().out

    code = cli.main(["calibrate", str(artifact_copy), "--data", str(image_folder), "--fpr", "0.02",
                     "--limit", "100", "--json"])
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert code == 0 and record["images"] == 100 and record["fpr"] == 0.02
    assert "chosen with seed 0" in record["data"] and "read 100/100 images" in err

    code = cli.main(["classify", str(next(image_folder.rglob("*.png"))), "--model", str(artifact_copy), "--json"])
    [result] = json.loads(capsys.readouterr().out)
    assert code == 0 and result["threshold"] == record["threshold"]
    assert result["alert_status"] in (ALERT_CLEAR, ALERT_RAISED)
    assert result["alert"] == (result["alert_score"] > record["threshold"])

    code = cli.main(["inspect", str(artifact_copy)])
    out = capsys.readouterr().out
    assert code == 0 and f"threshold {record['threshold']:.6g} at fpr 0.02 from 100 clean images" in out


@pytest.mark.parametrize("argv, code, message", [
    (["--data", "no-such-dir"], 2, "neither a directory of images"),
    (["--data", "{empty}"], 2, "holds no image files"),
    (["--data", "{images}", "--fpr", "2"], 2, "--fpr must lie in"),
    (["--data", "{images}", "--perturbations", "twirl:3"], 2, "unknown perturbation"),
    (["--data", "{images}", "--limit", "20"], 2, "at least 100 clean images"),
])
def test_cli_calibrate_errors(capsys, artifact_copy, image_folder, tmp_path, argv, code, message):
    (tmp_path / "empty").mkdir()
    argv = [arg.format(empty=tmp_path / "empty", images=image_folder) for arg in argv]
    before = (artifact_copy / MANIFEST).read_bytes()
    assert cli.main(["calibrate", str(artifact_copy), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (artifact_copy / MANIFEST).read_bytes() == before


def test_cli_calibrate_a_missing_model_exits_3(capsys, image_folder, tmp_path):
    assert cli.main(["calibrate", str(tmp_path / "nothing"), "--data", str(image_folder)]) == 3
    assert "no such artifact" in capsys.readouterr().err
