"""Triggers, their records, perturbations and the CA / ASR / PR arithmetic."""
import json

import pytest
import torch

from guard.errors import ArtifactError, ChecksumError, InputError
from training.attacks import BadNet, Blended, load_trigger, save_trigger, scaled
from training.evaluate import attack_success_rates, perturbation_resistivity
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
