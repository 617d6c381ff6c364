"""The feature density (guard.density) and its serving as the alert statistic "density":
the estimator against a hand computation, the class token each model form returns,
calibration storing the density in the artifact, served scores equal to a hand fit, and
the ways it is refused (compiled models, missing or damaged density, bad calibration)."""
from __future__ import annotations

import json

import pytest
import torch

import guard
from guard import cli
from guard.alerts import AlertConfig, alert_scores, density_scores
from guard.artifact import DENSITY_FILE, MANIFEST
from guard.calibration import calibrate, model_document, store_alert
from guard.density import ClassDensity
from guard.errors import ArtifactError, InputError
from guard.folded import fold
from guard.runtime import build_classifier
from guard.sealed import write_sealed

from conftest import CLASSES, save_image_folder, smooth_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SERVED, FROZEN = AlertConfig((), "density"), AlertConfig(("frozen",), "density")


def clean_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    return list(smooth_images(count, seed, blur=3))


def labels_of(count: int) -> list[int]:
    """Every class in both halves of the calibration images (even and odd positions)."""
    return [(index // 2) % len(CLASSES) for index in range(count)]


# --- the estimator ----------------------------------------------------------------------
def test_feature_density_is_the_shrunk_shared_covariance_mahalanobis_distance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    features = torch.randn(60, 5, generator=generator) + 3.0 * labels[:, None]
    density = ClassDensity.fit(features, labels, 3, shrinkage=0.5)
    # by hand: class means, the pooled within-class covariance plus 0.5 x its mean variance
    means = torch.stack([features[labels == k].mean(0) for k in range(3)]).double()
    centred = features.double() - means[labels]
    covariance = centred.T @ centred / 60
    covariance = covariance + 0.5 * covariance.trace() / 5 * torch.eye(5, dtype=torch.float64)
    queries = 4 * torch.randn(7, 5, generator=generator, dtype=torch.float64)
    expected = torch.stack([min((q - m) @ torch.linalg.solve(covariance, q - m) for m in means) for q in queries])
    torch.testing.assert_close(density.score(queries, batch_size=3).double(), expected, rtol=1e-5, atol=1e-5)
    # far from every clean class scores above every clean feature
    assert density.score(torch.full((1, 5), 50.0)).item() > density.score(features).max().item()


@pytest.mark.parametrize("features, labels, num_classes, shrinkage, message", [
    (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 0, 1]), 3, 0.1, "classes \\[2\\] have none"),
    (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 3]), 3, 0.1, "must lie in \\[0, 3\\)"),
    (torch.full((6, 4), float("nan")), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 0.1, "NaN"),
    (torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 0.1, "do not vary"),
    (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 0.0, "shrinkage"),
    (torch.randn(6), torch.tensor([0, 0, 1, 1, 2, 2]), 3, 0.1, "features \\[N, D\\]"),
])
def test_feature_density_rejects_bad_calibration(features, labels, num_classes, shrinkage, message):
    with pytest.raises(InputError, match=message):
        ClassDensity.fit(features, labels, num_classes, shrinkage)


def test_feature_density_rejects_features_of_another_width():
    density = ClassDensity.fit(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    with pytest.raises(InputError, match="4-dimensional"):
        density.score(torch.randn(2, 5))


def test_feature_density_round_trips_through_its_tensors_and_scores_nothing_as_empty():
    generator = torch.Generator().manual_seed(1)
    density = ClassDensity.fit(torch.randn(30, 4, generator=generator), torch.arange(30) % 3, 3)
    again = ClassDensity.from_tensors({name: tensor.float() for name, tensor in density.to_tensors().items()})
    queries = torch.randn(5, 4, generator=generator)
    torch.testing.assert_close(again.score(queries), density.score(queries), rtol=1e-5, atol=1e-4)
    assert density.score(torch.empty(0, 4)).shape == (0,)
    with pytest.raises(InputError, match="means \\[C, D\\] and a precision"):
        ClassDensity.from_tensors({"means": torch.zeros(3, 4), "precision": torch.zeros(3, 3)})


# --- the alert statistic ----------------------------------------------------------------

def test_the_density_statistic_takes_no_perturbation_or_only_the_frozen_tower():
    assert SERVED.num_perturbations == 0 and SERVED.needs_torch_backend and not SERVED.uses_frozen_tower
    assert FROZEN.uses_frozen_tower and FROZEN.needs_torch_backend
    assert not AlertConfig().needs_torch_backend
    assert AlertConfig.from_dict(SERVED.to_dict()) == SERVED
    with pytest.raises(InputError, match="takes no perturbation"):
        AlertConfig(("open:3",), "density")
    with pytest.raises(InputError, match="at least one perturbation"):
        AlertConfig((), "pr_terms")
    with pytest.raises(InputError, match="not a function of the outputs"):
        alert_scores(torch.zeros(2, 4), torch.zeros(2, 8), 2, SERVED)
    density = ClassDensity.fit(torch.randn(8, 3), torch.arange(8) % 2, 2)
    tokens = torch.randn(6, 3)
    # with the frozen view, the score reads the frozen tower's rows, which come last
    torch.testing.assert_close(density_scores(tokens, 3, FROZEN, density), density.score(tokens[3:]))
    torch.testing.assert_close(density_scores(tokens[:3], 3, SERVED, density), density.score(tokens[:3]))
    with pytest.raises(InputError, match="2-D with 3 x 2 rows"):
        density_scores(tokens[:3], 3, FROZEN, density)


def test_every_model_form_returns_the_class_token_of_its_rows(tiny_artifact):
    literal = build_classifier(guard.artifact.load_artifact(tiny_artifact.path))
    folded = fold(literal)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    encoder = literal.encoder
    with torch.no_grad():
        expected = torch.cat([encoder.final_class_token(images[:3], literal.prompts),
                              encoder.final_class_token(images[3:])])  # the last 2 rows: frozen tower
        for form in (literal, folded):
            logits, embedding, tokens = form(images, 2, class_token=True)
            torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
            plain_logits, plain_embedding = form(images, 2)
            torch.testing.assert_close(logits, plain_logits)
            torch.testing.assert_close(embedding, plain_embedding)


# --- serving it -------------------------------------------------------------------------

@pytest.mark.parametrize("config", [SERVED, FROZEN], ids=["served tower", "frozen tower"])
def test_calibrated_density_is_stored_and_served_as_fitted_by_hand(artifact_copy, config):
    images = clean_images(40)
    record = calibrate(artifact_copy, images, fpr=0.05, config=config, labels=labels_of(40))
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    assert DENSITY_FILE in manifest["files"] and manifest["alert"]["statistic"] == "density"
    # by hand: the literal model's class tokens (frozen tower or not), fitted on the labels
    literal = build_classifier(guard.artifact.load_artifact(artifact_copy))
    with guard.load(artifact_copy, device="cpu") as model:
        resized = torch.stack([model.preprocess.normalize(image[None])[0] for image in images])
        with torch.no_grad():
            tokens = literal.encoder.final_class_token(resized, None if config.uses_frozen_tower else literal.prompts)
        # fitted on every other image; the threshold set on the others
        expected = ClassDensity.fit(tokens[0::2], torch.tensor(labels_of(40))[0::2], len(CLASSES)).score(tokens)
        results = model.classify(images)
        served = torch.tensor([result.alert_score for result in results])
        torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-3)
        assert model.alert_config.threshold == pytest.approx(record["threshold"])
        assert record["images"] == record["fit_images"] == 20
        held_out = results[1::2]
        assert sum(result.alert for result in held_out) / len(held_out) == pytest.approx(record["clean_alert_rate"])
        # the labels are the plain classification's
        assert [r.index for r in results] == [r.index for r in model.classify(images, alerts=False)]
    # recalibrating with a perturbation alert drops the density file and its listing
    calibrate(artifact_copy, images, fpr=0.05, config=AlertConfig())
    assert DENSITY_FILE not in json.loads((artifact_copy / MANIFEST).read_text())["files"]
    assert not (artifact_copy / DENSITY_FILE).exists()
    with guard.load(artifact_copy, device="cpu") as model:
        assert model.fitted_alert is None and len(model.classify(images[:2])) == 2


def test_predicted_labels_must_cover_every_class(artifact_copy):
    # the random tiny model sends smooth noise to few classes: no Gaussian for the others
    with pytest.raises(InputError, match="predicts none of the calibration images as classes"):
        calibrate(artifact_copy, clean_images(40), fpr=0.05, config=SERVED)
    with pytest.raises(InputError, match="40 class indices"):
        calibrate(artifact_copy, clean_images(40), fpr=0.05, config=SERVED, labels=[0, 1])
    with pytest.raises(InputError, match="needs at least 40 clean images \\(half to fit it"):
        calibrate(artifact_copy, clean_images(30), fpr=0.05, config=SERVED, labels=labels_of(30))
    assert DENSITY_FILE not in json.loads((artifact_copy / MANIFEST).read_text())["files"]  # nothing written


def test_compiled_models_neither_inherit_nor_serve_the_density(artifact_copy, tmp_path):
    from export.onnx import export_onnx

    calibrate(artifact_copy, clean_images(40), fpr=0.05, config=SERVED, labels=labels_of(40))
    export_onnx(artifact_copy, tmp_path / "fp32.onnx", precision="fp32")
    images = clean_images(3, seed=1)
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as model:
        assert model.alert_config == AlertConfig()  # the uncalibrated default
        with pytest.raises(InputError, match="need the artifact directory on the torch backend"):
            model.class_tokens(images)
        with pytest.raises(InputError, match="need the artifact directory on the torch backend"):
            model.alert_scores(images, config=SERVED)
    with pytest.raises(InputError, match="served from artifact directories only"):
        store_alert(tmp_path / "fp32.onnx", SERVED, None, ClassDensity.fit(torch.randn(8, 3), torch.arange(8) % 4, 4))
    document, path, key = model_document(tmp_path / "fp32.onnx")
    document["alert"] = SERVED.to_dict()
    write_sealed(path, document, key)  # recorded anyway: refused at load, with the way out
    with pytest.raises(ArtifactError, match="recalibrate without it"):
        guard.load(tmp_path / "fp32.onnx", device="cpu")


def test_cli_calibrates_the_density_on_an_image_folder(artifact_copy, tmp_path, capsys):
    folder = save_image_folder(tmp_path / "clean", smooth_images(40, seed=3, blur=3))
    # an image folder carries no labels: the predictions must cover every class
    assert cli.main(["calibrate", str(artifact_copy), "--data", str(folder), "--fpr", "0.05",
                     "--statistic", "density"]) != 0
    assert "predicts none of the calibration images" in capsys.readouterr().err
    assert cli.main(["inspect", str(artifact_copy)]) == 0
    assert "pr_terms over open:3, median:3; NOT CALIBRATED" in capsys.readouterr().out


def test_builtin_calibration_data_comes_with_its_labels():
    pytest.importorskip("sklearn")
    from training.calibrate import dataset_images
    from training.data import load_dataset

    dataset = load_dataset("digits", "train")
    images, description, labels = dataset_images("digits", "train", 50, 0, dataset.classes)
    chosen = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:50].tolist())
    assert len(images) == len(labels) == 50 and "digits train, 50 images chosen with seed 0" == description
    assert dataset_images("digits", "train", 50, 0, ("other", "classes"))[2] is None  # not the model's classes
    assert labels == dataset.labels[chosen].tolist()
    assert all(torch.equal(image, dataset.images[index]) for image, index in zip(images, chosen))


def test_the_density_alert_is_thread_safe_and_names_a_bad_item(artifact_copy):
    from concurrent.futures import ThreadPoolExecutor

    calibrate(artifact_copy, clean_images(40), fpr=0.05, config=FROZEN, labels=labels_of(40))
    images = clean_images(8, seed=6)
    with guard.load(artifact_copy, device="cpu") as model:
        serial = [model.classify(image).to_dict() for image in images]
        calls = [(thread + step) % len(images) for thread in range(8) for step in range(25)]
        with ThreadPoolExecutor(8) as pool:  # an exception in a call re-raises here
            results = list(pool.map(lambda index: (index, model.classify(images[index]).to_dict()), calls))
        assert len(results) == 200
        assert all(result == serial[index] for index, result in results)
        with pytest.raises(InputError, match="input 2"):
            model.classify([images[0], images[1], torch.full((3, 32, 32), float("nan"))])
