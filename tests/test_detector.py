"""The input detector (guard.detector) and its serving as the alert statistic "detector":
the synthetic trigger families, that training separates clean images from them on images
it never saw, calibration storing the weights in the artifact, served scores equal to the
detector's own, and the ways it is refused (perturbations, compiled models, a missing or
damaged file)."""
from __future__ import annotations

import json

import pytest
import torch

import guard
from guard import cli
from guard.alerts import AlertConfig, alert_scores
from guard.artifact import DENSITY_FILE, DETECTOR_FILE, MANIFEST
from guard.calibration import calibrate, model_document, store_alert
from guard.detector import (FAMILIES, DetectorConfig, InputDetector, smooth_field, synthetic_trigger,
                            synthetic_triggers, train_detector, warp_images)
from guard.errors import ArtifactError, ChecksumError, InputError
from guard.sealed import write_sealed
from training.detection import auroc

from conftest import CLASSES, save_image_folder, smooth_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DETECTOR = AlertConfig((), "detector")
QUICK = DetectorConfig(steps=40, batch_size=32)


# --- the synthetic triggers --------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_changes_the_image_within_the_pixel_range(family):
    images = smooth_images(6)
    triggered = torch.stack([synthetic_trigger(image, family, torch.Generator().manual_seed(index))
                             for index, image in enumerate(images)])
    assert triggered.shape == images.shape and 0 <= triggered.min() and triggered.max() <= 1
    assert all((a - b).abs().max() > 0.01 for a, b in zip(triggered, images))
    if family == "patch":  # one square changed, the rest untouched
        changed = (triggered != images).any(1)
        assert all(0 < mask.sum() <= (32 // 6) ** 2 for mask in changed)


def test_synthetic_triggers_are_seeded_and_draw_a_family_per_image():
    images = smooth_images(40)
    first = synthetic_triggers(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, synthetic_triggers(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, synthetic_triggers(images, torch.Generator().manual_seed(4)))
    patched_only = synthetic_triggers(images, torch.Generator().manual_seed(3), ["patch"])
    assert ((patched_only != images).any(1).flatten(1).sum(1) <= (32 // 6) ** 2).all()
    for families in ([], "patch", ["patch", "stripes"]):
        with pytest.raises(InputError, match="trigger families"):
            synthetic_triggers(images, torch.Generator(), families)


def test_a_warp_of_strength_zero_is_the_identity_and_pixels_move_by_the_field():
    images = smooth_images(2)
    field = smooth_field(4, 32, torch.Generator().manual_seed(0))
    assert field.shape == (32, 32, 2) and field.abs().mean() > 0.5
    torch.testing.assert_close(warp_images(images, field, 0.0), images)
    # a constant field of 1 x strength 2 moves every sample one pixel step (2 / 32 of [-1, 1] ~ 1 px)
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    shifted = warp_images(ramp, torch.ones(32, 32, 2), 2 * 32 / 31)
    torch.testing.assert_close(shifted[..., :-1], ramp[..., 1:], atol=1e-4, rtol=0)


# --- training ------------------------------------------------------------------------

def test_the_detector_separates_fresh_triggers_of_every_family_on_unseen_images():
    detector = train_detector(smooth_images(64), DetectorConfig(steps=150, batch_size=32))
    unseen = smooth_images(80, seed=1)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        clean = detector(unseen)
        for family in FAMILIES:
            triggered = detector(torch.stack([synthetic_trigger(image, family, generator) for image in unseen]))
            assert auroc(clean, triggered) > 0.95, family


def test_training_is_deterministic_and_leaves_the_global_random_state_alone():
    images = smooth_images(16, side=16)
    state = torch.get_rng_state()
    first, second = train_detector(images, QUICK), train_detector(images, QUICK)
    assert torch.equal(torch.get_rng_state(), state)
    for name, tensor in first.to_tensors().items():
        assert torch.equal(tensor, second.to_tensors()[name])
    reloaded = InputDetector.from_tensors(first.to_tensors())
    with torch.no_grad():
        assert torch.equal(reloaded(images), first(images))


@pytest.mark.parametrize("clean, message", [
    (torch.zeros(1, 3, 16, 16), "at least two"),
    (torch.zeros(4, 1, 16, 16), "at least two resized clean images"),
    (torch.full((4, 3, 16, 16), float("nan")), "NaN or inf"),
])
def test_training_rejects_unusable_images(clean, message):
    with pytest.raises(InputError, match=message):
        train_detector(clean, QUICK)


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "steps must be a positive integer"), ({"batch_size": True}, "batch_size"),
    ({"lr": 0.0}, "lr must be > 0"), ({"families": ("warp", "noise")}, "trigger families"),
])
def test_detector_config_rejects_bad_settings(settings, message):
    with pytest.raises(InputError, match=message):
        DetectorConfig(**settings)


def test_malformed_detector_weights_are_an_input_error():
    tensors = InputDetector().to_tensors()
    del tensors["score.weight"]
    with pytest.raises(InputError, match="weights of InputDetector"):
        InputDetector.from_tensors(tensors)


def test_the_detector_statistic_takes_no_perturbation():
    assert DETECTOR.num_perturbations == 0 and DETECTOR.needs_torch_backend
    assert AlertConfig.from_dict(DETECTOR.to_dict()) == DETECTOR
    for perturbations in (("open:3",), ("frozen",)):
        with pytest.raises(InputError, match="takes no perturbation"):
            AlertConfig(perturbations, "detector")
    with pytest.raises(InputError, match="not a function of the outputs"):
        alert_scores(torch.zeros(2, 4), torch.zeros(2, 8), 2, DETECTOR)


# --- serving it -----------------------------------------------------------------------

def test_calibrated_detector_is_stored_and_served_as_trained(artifact_copy):
    images = list(smooth_images(40))
    record = calibrate(artifact_copy, images, fpr=0.05, config=DETECTOR, detector=QUICK)
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    assert DETECTOR_FILE in manifest["files"] and manifest["alert"]["statistic"] == "detector"
    assert record["images"] == record["fit_images"] == 20 and record["detector"] == QUICK.to_dict()
    with guard.load(artifact_copy, device="cpu") as model:
        assert isinstance(model.fitted_alert, InputDetector)
        resized = model.resized(images)
        # trained on every other image, as calibrate does; the threshold set on the others
        expected = train_detector(resized[0::2], QUICK)
        with torch.no_grad():
            by_hand = expected(resized)
        results = model.classify(images)
        served = torch.tensor([result.alert_score for result in results])
        torch.testing.assert_close(served, by_hand, rtol=1e-4, atol=1e-5)
        assert model.alert_config.threshold == pytest.approx(record["threshold"])
        held_out = results[1::2]
        assert sum(result.alert for result in held_out) / len(held_out) == pytest.approx(record["clean_alert_rate"])
        assert [r.index for r in results] == [r.index for r in model.classify(images, alerts=False)]
        assert all(r.alert_score is None for r in model.classify(images[:2], alerts=False))
    # recalibrating with the density swaps the files; with a perturbation alert, none is left
    calibrate(artifact_copy, images, fpr=0.05, config=AlertConfig((), "density"),
              labels=[(index // 2) % len(CLASSES) for index in range(40)])
    files = json.loads((artifact_copy / MANIFEST).read_text())["files"]
    assert DENSITY_FILE in files and DETECTOR_FILE not in files and not (artifact_copy / DETECTOR_FILE).exists()
    calibrate(artifact_copy, images, fpr=0.05, config=AlertConfig())
    assert not (artifact_copy / DENSITY_FILE).exists()
    with guard.load(artifact_copy, device="cpu") as model:
        assert model.fitted_alert is None
        with pytest.raises(InputError, match="no fitted detector: calibrate it with"):
            model.alert_scores(images[:2], config=DETECTOR)


def test_calibrating_the_detector_needs_two_halves_and_writes_nothing_when_short(artifact_copy):
    with pytest.raises(InputError, match="needs at least 40 clean images \\(half to fit it"):
        calibrate(artifact_copy, list(smooth_images(30)), fpr=0.05, config=DETECTOR, detector=QUICK)
    assert DETECTOR_FILE not in json.loads((artifact_copy / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("config, alert_file, fit", [
    (AlertConfig((), "density"), DENSITY_FILE, {"labels": [(index // 2) % len(CLASSES) for index in range(40)]}),
    (DETECTOR, DETECTOR_FILE, {"detector": QUICK}),
], ids=["density", "detector"])
def test_a_damaged_or_missing_fitted_alert_is_refused_at_load(artifact_copy, config, alert_file, fit):
    calibrate(artifact_copy, list(smooth_images(40)), fpr=0.05, config=config, **fit)
    data = bytearray((artifact_copy / alert_file).read_bytes())
    data[-3] ^= 0x01
    (artifact_copy / alert_file).write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        guard.load(artifact_copy, device="cpu")
    # a manifest that records the alert without its file
    document, path, key = model_document(artifact_copy)
    del document["files"][alert_file]
    write_sealed(path, document, key)
    with pytest.raises(ArtifactError, match=f"holds no fitted {config.statistic}; recalibrate without it"):
        guard.load(artifact_copy, device="cpu")


def test_weights_of_the_wrong_shape_are_refused_at_load(artifact_copy):
    from safetensors.torch import save_file

    from guard.sealed import file_records

    calibrate(artifact_copy, list(smooth_images(40)), fpr=0.05, config=DETECTOR, detector=QUICK)
    save_file({"features.0.weight": torch.zeros(2, 2)}, artifact_copy / DETECTOR_FILE)
    document, path, key = model_document(artifact_copy)
    document["files"].update(file_records(artifact_copy, [DETECTOR_FILE]))  # re-sealed: only the content is wrong
    write_sealed(path, document, key)
    with pytest.raises(ArtifactError, match="fitted detector of .* is unusable"):
        guard.load(artifact_copy, device="cpu")


def test_store_alert_pairs_each_statistic_with_what_it_fitted(artifact_copy, tmp_path):
    with pytest.raises(InputError, match="needs a fitted InputDetector"):
        store_alert(artifact_copy, DETECTOR, None)
    with pytest.raises(InputError, match="needs nothing fitted"):
        store_alert(artifact_copy, AlertConfig(), None, InputDetector())
    from export.onnx import export_onnx

    export_onnx(artifact_copy, tmp_path / "fp32.onnx", precision="fp32")
    with pytest.raises(InputError, match="served from artifact directories only"):
        store_alert(tmp_path / "fp32.onnx", DETECTOR, None, InputDetector())
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as model:
        with pytest.raises(InputError, match="need the artifact directory on the torch backend"):
            model.alert_scores(list(smooth_images(2)), config=DETECTOR)


def test_cli_calibrates_the_detector_on_an_image_folder(artifact_copy, tmp_path, capsys):
    folder = save_image_folder(tmp_path / "clean", smooth_images(40, seed=3))
    assert cli.main(["calibrate", str(artifact_copy), "--data", str(folder), "--fpr", "0.05",
                     "--statistic", "detector", "--detector-steps", "5", "--detector-families", "patch,warp"]) == 0
    captured = capsys.readouterr()
    assert "trained the input detector for 5/5 steps" in captured.err and "from 20 clean images" in captured.out
    record = json.loads((artifact_copy / MANIFEST).read_text())["alert_calibration"]
    assert record["detector"]["families"] == ["patch", "warp"] and record["detector"]["steps"] == 5
    assert cli.main(["calibrate", str(artifact_copy), "--data", str(folder), "--fpr", "0.05",
                     "--statistic", "detector", "--detector-families", "patch,noise"]) != 0
    assert "trigger families" in capsys.readouterr().err


@pytest.mark.parametrize("statistic, expected", [("detector", 4000), ("density", 2000), (None, 2000)])
def test_the_detector_calibrates_on_twice_the_images_by_default(artifact_copy, monkeypatch, statistic, expected):
    asked = []

    def calibration_images(data, limit, seed, classes):
        asked.append(limit)
        raise InputError("stop here")
    monkeypatch.setattr(cli, "calibration_images", calibration_images)
    args = ["calibrate", str(artifact_copy), "--data", str(artifact_copy)]
    args += ["--statistic", statistic] if statistic else []
    assert cli.main(args) != 0 and asked == [expected]
    assert cli.main(args + ["--limit", "300"]) != 0 and asked[-1] == 300


def test_the_detector_alert_is_thread_safe_and_names_a_bad_item(artifact_copy):
    from concurrent.futures import ThreadPoolExecutor

    calibrate(artifact_copy, list(smooth_images(40)), fpr=0.05, config=DETECTOR, detector=QUICK)
    images = list(smooth_images(8, seed=6))
    with guard.load(artifact_copy, device="cpu") as model:
        serial = [model.classify(image).to_dict() for image in images]
        calls = [(thread + step) % len(images) for thread in range(8) for step in range(25)]
        with ThreadPoolExecutor(8) as pool:  # an exception in a call re-raises here
            results = list(pool.map(lambda index: (index, model.classify(images[index]).to_dict()), calls))
        assert len(results) == 200 and all(result == serial[index] for index, result in results)
        # an image's score does not depend on the rest of its batch (up to float rounding)
        batched = [result.alert_score for result in model.classify(images)]
        assert batched == pytest.approx([result["alert_score"] for result in serial], rel=1e-5, abs=1e-6)
        with pytest.raises(InputError, match="input 2"):
            model.classify([images[0], images[1], torch.full((3, 32, 32), float("nan"))])


def test_training_detection_measures_the_detector_as_served_and_attacks_it(tiny_artifact):
    from training import detection
    from training.attacks import Backdoor, BadNet
    from training.evaluate import load_classifier

    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    calibration = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(16) % len(CLASSES)
    backdoor = Backdoor(BadNet(32, seed=0), 0, CLASSES[0])
    result = detection.evaluate_detection(model, preprocess, images, labels, backdoor, (), strip_counts=(),
                                          attack_images=images[:8], adaptive_steps=2,
                                          calibration=(calibration, torch.arange(20) % len(CLASSES)),
                                          detector=QUICK, detector_adaptive_weights=(1.0,))
    name = "input detector, patch+blend+sine+warp"
    entry = result["input_detector"][name]
    assert entry["passes"] == 1 and entry["detector"] == QUICK.to_dict() and 0.0 <= entry["auroc"] <= 1.0
    # the scores are those of the detector trained on the calibration images, as calibrate trains it
    expected = train_detector(preprocess.resize(calibration), QUICK)
    with torch.no_grad():
        by_hand = expected(preprocess.resize(images))
    torch.testing.assert_close(torch.tensor(result["scores"][name][0]), by_hand, rtol=1e-4, atol=1e-5)
    [adaptive] = result["adaptive"]
    assert (adaptive["alert"], adaptive["weight"]) == (name, 1.0) and 0.0 <= adaptive["evade@1"] <= 1.0
    assert name in detection.format_table(result)
