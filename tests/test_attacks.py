"""Triggers, their records, perturbations and the CA / ASR / PR arithmetic."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from guard.errors import ArtifactError, ChecksumError, DataError, InputError
from guard.hashing import sha256_file
from training.attacks import (ATTACKS, SIG, SUITE, BadNet, Blended, CallableTrigger, ImageTrigger,
                              LabelConsistentBadNet, WaNet, import_callable, load_trigger, resolve_class,
                              save_trigger, scaled)
from training.evaluate import Evaluation, attack_success_rates, format_summary, perturbation_resistivity
from training.perturbations import gaussian_blur, standard_perturbations


def _images(count=4, side=32, seed=0):
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_trigger_sizes_scale_with_the_image_side():
    assert scaled(16, 224) == 16 and scaled(16, 32) == 3 and scaled(16, 8) == 1
    assert BadNet(224).patch_size == 16 and BadNet(32).patch_size == 3


def test_seeded_badnet_pastes_one_pattern_at_one_place():
    trigger = BadNet(32, seed=3)
    images = _images()
    out = trigger(images)
    changed = (out != images).any(dim=1)
    row, col = trigger.corner
    for index in range(len(images)):
        assert torch.equal(out[index, :, row:row + 3, col:col + 3], trigger.pattern)
        assert changed[index].sum() <= 9 and changed[index, row:row + 3, col:col + 3].sum() == changed[index].sum()
    assert not torch.equal(BadNet(32, seed=4).pattern, trigger.pattern)


def test_per_image_badnet_moves_the_patch_but_is_reproducible():
    trigger = BadNet(32, seed=0, position="per-image")
    images = torch.zeros(16, 3, 32, 32)
    first, second = trigger(images), trigger(images)
    assert torch.equal(first, second)
    corners = {tuple((image.abs().sum(0) > 0).nonzero()[0].tolist()) for image in first}
    assert len(corners) > 4
    other = trigger(images, torch.Generator().manual_seed(99))
    assert not torch.equal(other, first)


def test_blended_mixes_with_a_fixed_pattern():
    trigger = Blended(32, seed=1, alpha=0.2)
    images = _images()
    torch.testing.assert_close(trigger(images), 0.8 * images + 0.2 * trigger.pattern)
    with pytest.raises(InputError):
        Blended(32, alpha=1.5)


def test_triggers_refuse_wrong_shapes():
    with pytest.raises(InputError, match="32, 32"):
        BadNet(32)(torch.rand(2, 3, 28, 28))
    with pytest.raises(InputError):
        BadNet(32, position="anywhere")


def test_trigger_record_round_trips_and_detects_tampering(tmp_path):
    trigger = BadNet(32, seed=5)
    save_trigger(trigger, tmp_path, target=2, target_name="pullover", extra={"poison_rate": 0.05})
    backdoor = load_trigger(tmp_path)
    assert (backdoor.target, backdoor.target_name) == (2, "pullover")
    images = _images()
    assert torch.equal(backdoor.trigger(images), trigger(images))
    record = json.loads((tmp_path / "trigger.json").read_text())
    assert record["attack"] == "badnet" and record["poison_rate"] == 0.05
    data = bytearray((tmp_path / "trigger.safetensors").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "trigger.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        load_trigger(tmp_path)
    with pytest.raises(ArtifactError, match="trigger.json"):
        load_trigger(tmp_path / "nowhere")


def test_asr_excludes_or_counts_target_class_images():
    predictions = torch.tensor([0, 0, 1, 0, 2, 0])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    asr, asr_all = attack_success_rates(predictions, labels, target=0)
    assert asr == pytest.approx(100 * 2 / 4)  # non-target images 1, 2, 3, 4: two hit
    assert asr_all == pytest.approx(100 * 4 / 6)
    with pytest.raises(InputError):
        attack_success_rates(predictions, torch.zeros(6, dtype=torch.long), target=0)


def test_summary_table_shows_every_asr_and_dashes_what_was_not_measured():
    rows = {"backdoored": Evaluation(85.5, 99.25, 99.5, {"hflip": 0.95}, asr_untriggered=1.75),
            "with floor": Evaluation(85.5, 99.25, 99.5, {"hflip": 0.95}, asr_untriggered=1.75, floor=2.0,
                                     excess_asr=97.25),
            "clean only": Evaluation(84.0, None, None)}
    header, _, backdoored, floored, clean = format_summary(rows).splitlines()
    assert header.split()[:11] == ["model", "CA", "%", "ASR", "%", "floor", "%", "excess", "ASR-all", "%",
                                   "untriggered"]
    assert backdoored.split() == ["backdoored", "85.50", "99.25", "-", "-", "99.50", "1.75", "0.950", "0.950"]
    assert floored.split() == ["with", "floor", "85.50", "99.25", "2.00", "97.25", "99.50", "1.75", "0.950", "0.950"]
    assert clean.split() == ["clean", "only", "84.00", "-", "-", "-", "-", "-", "-", "-"]  # mean PR, hflip


def test_perturbation_resistivity_is_a_ratio_of_mean_cosines():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert perturbation_resistivity((logits, features), (logits, features)) == pytest.approx(1.0)
    moved = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # cosines 1/sqrt(2) and 1
    expected = (2 ** -0.5 + 1) / 2
    assert perturbation_resistivity((logits, features), (logits, moved)) == pytest.approx(expected)


def test_standard_perturbations_are_deterministic_and_sane():
    images = _images(side=32)
    perturbations = standard_perturbations(32)
    assert set(perturbations) == {"noise_0.01", "noise_0.03", "blur_3", "blur_5", "color_jitter", "hflip",
                                  "badnet", "blended"}
    for name, perturb in perturbations.items():
        out = perturb(images)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1, name
        assert torch.equal(out, perturb(images)), name
        assert not torch.equal(out, images), name
    flat = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(gaussian_blur(5)(flat), flat)
    noise = perturbations["noise_0.03"](images) - images
    assert 0.02 < noise.std() < 0.04


# --- the attack suite ------------------------------------------------------------------

def test_badnet_and_blended_are_unchanged(tmp_path):
    # zoo/badnet's trigger.safetensors hash: BadNet's pattern for seed 0 must never change
    save_trigger(BadNet(32, seed=0), tmp_path, target=0, target_name="t-shirt")
    assert json.loads((tmp_path / "trigger.json").read_text())["tensors_sha256"] == \
        "4940f1b6ef17135c7195c45748479eb16c4d6f2b0618b1891899c4b40ef5c790"
    assert BadNet(32, seed=0).corner == (25, 29)
    blended = hashlib.sha256(Blended(32, seed=0).pattern.numpy().tobytes()).hexdigest()
    assert blended == "ecad0f903c8e75ec52e039cccba6cb5be81ff9ba58f412d0c16216f4157b718d"


def test_every_suite_trigger_is_registered_deterministic_and_in_range():
    assert set(SUITE) <= set(ATTACKS) and {"callable", "image"} <= set(ATTACKS)
    images = _images(8)
    for trigger in (BadNet(32), Blended(32), WaNet(32), SIG(32), LabelConsistentBadNet(32)):
        out = trigger(images)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1, trigger.name
        assert torch.equal(out, trigger(images)), trigger.name
        assert torch.equal(out, type(trigger)(32)(images)), trigger.name  # same seed, same trigger
        assert not torch.equal(out, images), trigger.name
    assert not torch.equal(WaNet(32, seed=1)(images), WaNet(32, seed=0)(images))


def test_sig_adds_a_horizontal_sine_and_clips():
    trigger = SIG(32)
    assert trigger.clean_label and trigger.amplitude == pytest.approx(60 / 255)
    columns = np.arange(32)
    sine = (60 / 255) * np.sin(2 * np.pi * 6 * columns / 32)
    images = _images()
    expected = np.clip(images.numpy() + sine[None, None, None, :], 0, 1)
    np.testing.assert_allclose(trigger(images).numpy(), expected, atol=1e-6)
    grey = trigger(torch.full((1, 3, 32, 32), 0.5))[0, 0] - 0.5
    assert torch.equal(grey, grey[:1].expand(32, -1))  # constant down every column
    assert np.abs(np.fft.rfft(grey[0].numpy())).argmax() == 6  # six periods across the row
    assert grey.abs().max() == pytest.approx(60 / 255, abs=0.01)
    with pytest.raises(InputError):
        SIG(32, amplitude=0)


def test_label_consistent_badnet_is_badnets_patch_for_clean_label_poisoning():
    images = _images()
    assert LabelConsistentBadNet.clean_label and not BadNet.clean_label
    assert torch.equal(LabelConsistentBadNet(32, seed=3)(images), BadNet(32, seed=3)(images))


def _coordinate_images(side=32):
    axis = torch.linspace(0, 1, side)
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack((columns, rows, torch.zeros_like(rows)))[None]


def test_wanet_is_identity_at_strength_zero_and_a_smooth_warp_otherwise():
    images = _images()
    torch.testing.assert_close(WaNet(32, strength=0.0)(images), images, atol=1e-5, rtol=0)
    ramps = _coordinate_images()
    trigger = WaNet(32, seed=0, grid=4, strength=4.0)
    displacement_px = (trigger(ramps) - ramps)[0, :2] * 31  # warped minus original (x, y) positions in px
    interior = (slice(4, 28), slice(4, 28))  # away from the clamped border
    expected = trigger.strength * trigger.field.permute(2, 0, 1) / 32 * 31 / 2
    torch.testing.assert_close(displacement_px[:, interior[0], interior[1]],
                               expected[:, interior[0], interior[1]], atol=1e-3, rtol=0)
    assert displacement_px.abs().max() > 1.0

    def roughness(warp):
        moved = (warp(ramps) - ramps)[0, :2] * 31
        steps = torch.cat([(moved[:, 1:] - moved[:, :-1]).flatten(), (moved[:, :, 1:] - moved[:, :, :-1]).flatten()])
        return steps.abs().max() / moved.abs().max()

    assert roughness(trigger) < 0.35  # neighbours move alike: a smooth field
    assert roughness(WaNet(32, seed=0, grid=32, strength=4.0)) > 0.5  # a per-pixel field is not
    with pytest.raises(InputError):
        WaNet(32, grid=1)
    with pytest.raises(InputError):
        WaNet(32, strength=-1.0)


@pytest.mark.parametrize("trigger", [WaNet(32, seed=4, strength=2.5), SIG(32, amplitude=0.3, frequency=4),
                                     LabelConsistentBadNet(32, seed=7), Blended(32, seed=2, alpha=0.1)],
                         ids=lambda trigger: trigger.name)
def test_suite_trigger_records_round_trip_exactly(tmp_path, trigger):
    save_trigger(trigger, tmp_path, target=3, target_name="dress")
    backdoor = load_trigger(tmp_path)
    assert type(backdoor.trigger) is type(trigger) and backdoor.trigger.params() == trigger.params()
    images = _images(6, seed=9)
    assert torch.equal(backdoor.trigger(images), trigger(images))


def test_a_record_with_foreign_parameters_is_refused(tmp_path):
    save_trigger(SIG(32), tmp_path, target=0, target_name="t-shirt")
    record = json.loads((tmp_path / "trigger.json").read_text())
    record["params"]["speed"] = 3
    (tmp_path / "trigger.json").write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="rebuild"):
        load_trigger(tmp_path)


# --- bring your own trigger --------------------------------------------------------------

def _picture(path, side=12):
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[:, : side // 2] = (255, 0, 0)
    pixels[:, side // 2:] = (0, 0, 255)
    Image.fromarray(pixels).save(path)
    return path


def test_image_trigger_patch_goes_where_asked_and_blend_mixes(tmp_path):
    picture = _picture(tmp_path / "logo.png")
    images = _images()
    patch = ImageTrigger.from_file(picture, 32, "patch", position="bottom-right", size=4)
    out = patch(images)
    changed = (out != images).any(dim=1)
    assert changed[:, 28:, 28:].all() and changed.sum() == 4 * 16
    assert torch.equal(out[:, :, 28:, 28:], patch.pattern.expand(4, -1, -1, -1))
    assert patch.pattern[0, :, 0].min() > 0.9 and patch.pattern[2, :, -1].min() > 0.9  # red left, blue right
    placed = ImageTrigger.from_file(picture, 32, "patch", position="5,7", size=4, alpha=0.5)
    torch.testing.assert_close(placed(images)[:, :, 5:9, 7:11], 0.5 * images[:, :, 5:9, 7:11] + 0.5 * placed.pattern)
    blend = ImageTrigger.from_file(picture, 32, "blend")
    assert blend.alpha == 0.2 and blend.pattern.shape == (3, 32, 32)
    torch.testing.assert_close(blend(images), 0.8 * images + 0.2 * blend.pattern)
    assert patch.source == "logo.png" and patch.source_sha256 == sha256_file(picture)


def test_image_trigger_round_trips_without_the_file(tmp_path):
    picture = _picture(tmp_path / "logo.png")
    trigger = ImageTrigger.from_file(picture, 32, "patch", position="center", size=5, alpha=0.7)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_trigger(trigger, model_dir, target=1, target_name="trouser")
    picture.unlink()
    images = _images()
    assert torch.equal(load_trigger(model_dir).trigger(images), trigger(images))


def test_bad_image_trigger_specs_are_typed_errors(tmp_path):
    picture = _picture(tmp_path / "logo.png")
    with pytest.raises(DataError, match="does not exist"):
        ImageTrigger.from_file(tmp_path / "missing.png", 32)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        ImageTrigger.from_file(tmp_path / "broken.png", 32)
    with pytest.raises(InputError, match="mode"):
        ImageTrigger.from_file(picture, 32, "stamp")
    with pytest.raises(InputError, match="ROW,COL"):
        ImageTrigger.from_file(picture, 32, position="middle")
    with pytest.raises(InputError, match="leaves"):
        ImageTrigger.from_file(picture, 32, position="30,30", size=4)
    with pytest.raises(InputError, match="alpha"):
        ImageTrigger.from_file(picture, 32, alpha=1.5)
    with pytest.raises(InputError, match="size"):
        ImageTrigger.from_file(picture, 32, size=40)


def invert_corner(images):
    """A trigger of our own: invert the top-left 4 x 4 pixels (works in place on purpose)."""
    images[:, :, :4, :4] = 1.0 - images[:, :, :4, :4]
    return images


def test_callable_trigger_applies_the_function_without_touching_its_input(tmp_path):
    trigger = CallableTrigger(32, "test_attacks:invert_corner")
    images = _images()
    kept = images.clone()
    out = trigger(images)
    assert torch.equal(images, kept)
    assert torch.equal(out[:, :, :4, :4], 1 - kept[:, :, :4, :4]) and torch.equal(out[:, :, 4:], kept[:, :, 4:])
    save_trigger(trigger, tmp_path, target=0, target_name="t-shirt")
    assert json.loads((tmp_path / "trigger.json").read_text())["params"]["function"] == "test_attacks:invert_corner"
    assert torch.equal(load_trigger(tmp_path).trigger(images), out)


def shrink(images):
    return images[:, :, :16, :16]


def test_bad_trigger_functions_are_typed_errors():
    for spec, message in [("no_colon", "package.module:function"), ("surely_not_a_module_xyz:f", "PYTHONPATH"),
                          ("math:no_such_function", "no attribute"), ("math:pi", "not a callable")]:
        with pytest.raises(InputError, match=message):
            import_callable(spec)
    with pytest.raises(InputError, match="shape"):
        CallableTrigger(32, "test_attacks:shrink")(_images())
    assert import_callable("math:sqrt") is math.sqrt


def test_classes_resolve_by_name_or_index():
    classes = ("t-shirt", "trouser", "ankle boot")
    assert resolve_class(classes, "2") == 2 and resolve_class(classes, "Ankle Boot") == 2
    assert resolve_class(classes, 0) == 0
    with pytest.raises(InputError, match="out of range"):
        resolve_class(classes, "3")
    with pytest.raises(InputError, match="unknown class"):
        resolve_class(classes, "sock")
