"""The alert registry: a new statistic is one AlertKind class and one register() entry, and then
calibrates, is stored, exported and served like the built-in ones; the typed Manifest; the one
Backend.run signature."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import guard
from guard import cli
from guard.alert_kinds import REGISTRY, AlertKind, AlertRows, Resistivity, kind_of, register, unregister
from guard.alerts import AlertConfig
from guard.artifact import MANIFEST, read_manifest
from guard.calibration import calibrate
from guard.errors import ArtifactError, InputError
from guard.manifest import Manifest

from conftest import CLASSES, save_image_folder, smooth_images


class LogitMargin(AlertKind):
    """A toy statistic: minus the margin between the two largest logits of the image itself
    (a triggered input is often classified with a large margin). Higher = more suspicious."""

    @classmethod
    def check(cls, config: AlertConfig) -> None:
        if config.num_perturbations:
            raise InputError("the logit margin reads the image itself and takes no perturbation")

    def score(self, rows: AlertRows) -> torch.Tensor:
        top2 = rows.logits[:rows.n_images].float().topk(2, dim=-1).values
        return top2[:, 1] - top2[:, 0]


@pytest.fixture
def margin():
    register("margin", LogitMargin)  # the one entry a new statistic needs
    yield LogitMargin
    unregister("margin")


def test_a_registered_statistic_calibrates_stores_and_serves_end_to_end(margin, artifact_copy, tmp_path):
    images = list(smooth_images(40, seed=1))
    probes = list(smooth_images(6, seed=2))
    config = AlertConfig((), "margin")
    assert not config.needs_torch_backend and AlertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="takes no perturbation"):
        AlertConfig(("open:3",), "margin")

    record = calibrate(artifact_copy, images, fpr=0.05, config=config)
    with guard.load(artifact_copy, device="cpu") as model:
        logits = model.logits(images)
        top2 = logits.topk(2, dim=-1).values
        expected = (top2[:, 1] - top2[:, 0]).double()
        assert record["threshold"] == pytest.approx(torch.quantile(expected, 0.95).item(), abs=1e-6)
        assert record["images"] == 40 and "fit_images" not in record
        results = model.classify(probes)
        probe_top2 = model.logits(probes).topk(2, dim=-1).values
    assert [result.alert_score for result in results] == pytest.approx(
        (probe_top2[:, 1] - probe_top2[:, 0]).tolist(), abs=1e-6)
    assert all(result.threshold == record["threshold"] for result in results)
    assert all(result.alert == (result.alert_score > record["threshold"]) for result in results)
    assert all(result.alert_status in ("alert", "clear") for result in results)

    # the manifest round trip: what is written reads back as the same alert
    entry = json.loads((artifact_copy / MANIFEST).read_text())["alert"]
    assert entry == {"perturbations": [], "statistic": "margin", "threshold": record["threshold"]}
    assert Manifest.from_document(read_manifest(artifact_copy)).alert == AlertConfig((), "margin", record["threshold"])
    assert kind_of("margin").from_manifest(entry).config == AlertConfig((), "margin", record["threshold"])

    # an fp32 export carries the alert over in its sidecar and serves the same scores
    from export.onnx import export_onnx

    export_onnx(artifact_copy, tmp_path / "fp32.onnx", precision="fp32")
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as compiled:
        assert compiled.alert_config == AlertConfig((), "margin", record["threshold"])
        again = compiled.classify(probes)
    assert [r.alert_score for r in again] == pytest.approx([r.alert_score for r in results], abs=1e-4)


def test_an_unregistered_statistic_is_a_clear_artifact_error(margin, artifact_copy):
    calibrate(artifact_copy, list(smooth_images(20, seed=1)), fpr=0.1, config=AlertConfig((), "margin"))
    unregister("margin")
    with pytest.raises(ArtifactError, match="alert entry .*unknown statistic 'margin'"):
        guard.load(artifact_copy, device="cpu")
    register("margin", LogitMargin)
    assert guard.load(artifact_copy, device="cpu").alert_config.statistic == "margin"


def test_the_registry_refuses_clashes_and_keeps_the_built_ins():
    assert {"pr_terms", "pr", "kl", "density", "detector"} <= set(REGISTRY) and REGISTRY["pr"] is Resistivity
    with pytest.raises(InputError, match="new name"):
        register("pr_terms", LogitMargin)
    with pytest.raises(InputError, match="AlertKind subclass"):
        register("toy", object)

    class Clash(LogitMargin):
        fitted_type, fitted_file = dict, "alert_density.safetensors"
    with pytest.raises(InputError, match="alert_density.safetensors"):
        register("clash", Clash)
    with pytest.raises(InputError, match="cannot be removed"):
        unregister("density")
    with pytest.raises(InputError, match="unknown statistic 'nope'; known: .*pr_terms"):
        AlertConfig((), "nope")


def test_the_frozen_tower_is_an_option_of_resistivity_in_the_manifest_spelling():
    legacy = AlertConfig(("open:3", "median:3", "frozen"))
    option = AlertConfig(("open:3", "median:3"), frozen_tower=True)
    assert legacy == option and option.perturbations == ("open:3", "median:3") and option.num_perturbations == 3
    assert option.to_dict()["perturbations"] == ["open:3", "median:3", "frozen"]  # format 1 on disk
    assert AlertConfig.from_dict(option.to_dict()) == option and option.needs_torch_backend
    with pytest.raises(InputError, match="at least one perturbation"):
        AlertConfig((), "pr_terms")
    assert AlertConfig((), "pr_terms", frozen_tower=True).num_perturbations == 1  # the frozen view alone


# --- the typed manifest ----------------------------------------------------------------------

def test_the_manifest_names_a_bad_field(tiny_artifact):
    document = read_manifest(tiny_artifact.path)
    manifest = Manifest.from_document(document, tiny_artifact.path / MANIFEST)
    assert manifest.kind == "artifact" and manifest.classes == CLASSES and manifest.precision == "fp32"
    assert manifest.preprocess == tiny_artifact.preprocess and manifest.alert is None
    assert manifest.alert_config == AlertConfig() and manifest["method"]["name"] == "rvpt"
    for field, value, message in (("classes", "cat", "'classes' entry .* a non-empty list"),
                                  ("preprocess", {"mean": [0.5]}, "'preprocess' entry"),
                                  ("base_model", None, "'base_model' entry"),
                                  ("files", [], "'files' entry"),
                                  ("alert", {"statistic": "pr"}, "alert entry .* needs 'perturbations'")):
        with pytest.raises(ArtifactError, match=message):
            Manifest.from_document({**document, field: value}, "manifest.json")


def test_existing_sidecars_and_artifacts_read_as_manifests(tiny_artifact, tmp_path):
    from export.onnx import export_onnx
    from guard.sidecar import read_sidecar

    export_onnx(tiny_artifact.path, tmp_path / "fp32.onnx", precision="fp32")
    sidecar = read_sidecar(tmp_path / "fp32.onnx", "onnx")
    manifest = Manifest.from_document(sidecar)
    assert manifest.kind == "onnx" and manifest.details() == sidecar["onnx"]
    assert manifest.checksum == sidecar["sidecar_sha256"] and manifest.classes == CLASSES
    with guard.load(tmp_path / "fp32.onnx", device="cpu") as model:
        assert isinstance(model.manifest, Manifest) and model.manifest["precision"] == "fp32"


def test_a_labelled_image_folder_labels_the_calibration_images(tmp_path):
    images = smooth_images(4, seed=3)
    for index, name in enumerate(CLASSES[:2]):
        save_image_folder(tmp_path / "labelled" / name, images[2 * index:2 * index + 2])
    files, _, labels = cli.calibration_images(str(tmp_path / "labelled"), 10, 0, CLASSES)
    assert [Path(file).parent.name for file in files] == ["airplane", "airplane", "bird", "bird"]
    assert labels == [0, 0, 1, 1]
    assert cli.calibration_images(str(tmp_path / "labelled"), 10, 0, ("x", "y"))[2] is None
    shutil.copytree(tmp_path / "labelled" / "bird", tmp_path / "labelled" / "unknown")
    assert cli.calibration_images(str(tmp_path / "labelled"), 10, 0, CLASSES)[2] is None  # not every image labelled


# --- one Backend.run signature -----------------------------------------------------------

def test_every_backend_takes_the_same_run_arguments(tiny_artifact, tmp_path):
    from export.onnx import export_onnx

    export_onnx(tiny_artifact.path, tmp_path / "fp32.onnx", precision="fp32")
    images = tiny_artifact.preprocess.normalize(smooth_images(3, seed=4))
    with guard.load(tiny_artifact.path, device="cpu") as torch_model, \
            guard.load(tmp_path / "fp32.onnx", device="cpu") as onnx_model:
        torch_backend, onnx_backend = torch_model._open_backend(), onnx_model._open_backend()
        plain = onnx_backend.run(images, 0, False)
        torch.testing.assert_close(plain[0], torch_backend.run(images, 0, False)[0], atol=1e-4, rtol=1e-4)
        logits, embedding, tokens = torch_backend.run(images, frozen_rows=1, class_token=True)
        assert tokens.shape[0] == 3 and not torch.allclose(logits[2], plain[0][2])  # the last row: frozen tower
        with pytest.raises(InputError, match="need the artifact directory on the torch backend"):
            onnx_backend.run(images, frozen_rows=1)
        with pytest.raises(InputError, match="frozen_rows must be an integer in \\[0, 3\\]"):
            torch_backend.run(images, frozen_rows=4)
