"""training.inversion (Neural-Cleanse-style trigger inversion on the shots) and RVPT's
unlearning extension, on the tiny random CLIP of conftest.py; the real backdoor case is
in tests/test_pipeline.py."""
import re

import pytest
import torch
import torch.nn.functional as F

from guard.errors import InputError
from guard.prompted import PromptedVisionEncoder, class_logits
from training.data import ImageDataset
from training.inversion import Inversion, InvertedTrigger, anomaly_indices, invert_triggers, refine_trigger
from training.rvpt import RVPTConfig, distillation_loss, train_rvpt

from conftest import CLASSES


@pytest.fixture()
def shots():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageDataset("synthetic", images, torch.arange(16) % len(CLASSES), CLASSES)


def _objective(encoder, tiny_artifact, shots, trigger, mask_weight):
    """The inversion's objective for trigger.target on the other shots."""
    others = shots.labels != trigger.target
    images = tiny_artifact.preprocess.resize(shots.images[others])
    with torch.no_grad():
        embedding = encoder(tiny_artifact.preprocess.normalize(trigger(images))).embedding
        logits = class_logits(embedding, F.normalize(tiny_artifact.text_features, dim=-1), 20.0)
        target = torch.full((len(images),), trigger.target)
        return (F.cross_entropy(logits, target) + mask_weight * trigger.mask.sum()).item()


def test_anomaly_index_is_the_scaled_distance_below_the_median():
    l1 = torch.tensor([10.0, 40.0, 44.0, 48.0, 52.0])  # median 44, MAD 4
    expected = (44.0 - l1) / (1.4826 * 4.0)
    assert torch.allclose(anomaly_indices(l1), expected)
    assert int(anomaly_indices(l1).argmax()) == 0


def test_inverted_trigger_stamps_mask_and_pattern():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    trigger = InvertedTrigger(0, mask, torch.full((1, 3, 4, 4), 0.25))
    images = torch.ones(2, 3, 4, 4)
    stamped = trigger(images)
    assert torch.all(stamped[..., :2, :2] == 0.25) and torch.all(stamped[..., 2:, :] == 1.0)


def test_inversion_lowers_its_objective_and_is_reproducible(tiny_artifact, shots):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    arguments = (encoder, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess, shots)
    start = invert_triggers(*arguments, steps=1, mask_weight=0.01)
    longer = invert_triggers(*arguments, steps=30, mask_weight=0.01)
    again = invert_triggers(*arguments, steps=30, mask_weight=0.01)
    assert torch.equal(longer.masks, again.masks) and longer.anomaly_index == again.anomaly_index
    assert longer.masks.shape == (len(CLASSES), 1, 32, 32) and longer.patterns.shape == (len(CLASSES), 3, 32, 32)
    assert 0 <= longer.masks.min() and longer.masks.max() <= 1
    assert 0 <= longer.patterns.min() and longer.patterns.max() <= 1
    assert all(0.0 <= flip <= 1.0 for flip in longer.flip_rate)
    assert longer.mask_l1 == pytest.approx(longer.masks.flatten(1).sum(1).tolist())
    assert longer.suspected == int(torch.tensor(longer.anomaly_index).argmax())
    assert longer.trigger.target == longer.suspected
    for target in range(len(CLASSES)):  # each class's objective went down with more steps
        assert _objective(encoder, tiny_artifact, shots, longer.trigger_of(target), 0.01) \
            < _objective(encoder, tiny_artifact, shots, start.trigger_of(target), 0.01)
    record = longer.to_dict(CLASSES)
    assert record["suspected_target"] == CLASSES[longer.suspected] and set(record["classes"]) == set(CLASSES)


@pytest.mark.parametrize("steps, mask_weight", [(0, 0.01), (5, -1.0)])
def test_bad_inversion_settings_are_input_errors(tiny_artifact, shots, steps, mask_weight):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    with pytest.raises(InputError):
        invert_triggers(encoder, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess, shots,
                        steps=steps, mask_weight=mask_weight)


def test_inversion_needs_shots_of_every_class(tiny_artifact, shots):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    missing = shots.subset((shots.labels != 2).nonzero().flatten())
    with pytest.raises(InputError, match="every class"):
        invert_triggers(encoder, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess, missing,
                        steps=1, mask_weight=0.01)


def _inversion(median_l1: float) -> Inversion:
    """A hand-made inversion whose suspected target is class 0 (a 16-pixel corner mask at 0.5 over
    a black pattern) and whose median mask L1 is `median_l1` (the recorded norms are bookkeeping:
    only the suspect and the median matter to unlearning)."""
    masks = torch.zeros(len(CLASSES), 1, 32, 32)
    masks[0, :, :4, :4] = 0.5
    mask_l1 = (median_l1 / 2,) + (median_l1,) * (len(CLASSES) - 1)
    inversion = Inversion(masks, torch.zeros(len(CLASSES), 3, 32, 32), mask_l1, (1.0,) * len(CLASSES),
                          tuple(anomaly_indices(torch.tensor(mask_l1)).tolist()))
    assert inversion.suspected == 0 and inversion.median_mask_l1 == median_l1
    return inversion


def _rvpt(tiny_artifact, shots, inversion=None, **overrides):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    config = RVPTConfig(start_block=1, num_tokens=4, **{"epochs": 3, "batch_size": 8, "lr": 0.5, **overrides})
    return train_rvpt(encoder, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess, shots, config,
                      inversion=inversion)


def test_unlearning_trains_on_the_stamped_shots_and_is_off_by_default(tiny_artifact, shots):
    inversion = _inversion(median_l1=1e6)
    paper, paper_history = _rvpt(tiny_artifact, shots)
    ignored, _ = _rvpt(tiny_artifact, shots, inversion=inversion, unlearn_refresh=1)  # weight 0: nothing changes
    assert torch.equal(paper.tokens, ignored.tokens)
    assert all(epoch["unlearn"] == 0.0 and epoch["triggers"] == 0 for epoch in paper_history)
    unlearned, history = _rvpt(tiny_artifact, shots, inversion=inversion, unlearn_weight=1.0)
    assert not torch.equal(unlearned.tokens, paper.tokens)
    assert history[-1]["unlearn"] < history[0]["unlearn"]
    assert all(epoch["triggers"] == 1 for epoch in history)  # no refresh: the first trigger only
    with pytest.raises(InputError, match="trigger inversion"):
        _rvpt(tiny_artifact, shots, unlearn_weight=1.0)


def test_refined_trigger_lowers_the_objective_through_the_prompts_only(tiny_artifact, shots):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    prompts = encoder.new_prompts(1, 4)
    start = _inversion(median_l1=40.0).trigger
    arguments = (encoder, prompts, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess, shots, start)
    refined, flip_rate = refine_trigger(*arguments, steps=20, mask_weight=0.01)
    again, _ = refine_trigger(*arguments, steps=20, mask_weight=0.01)
    # reproducible up to the order of multithreaded CPU reductions; Adam's normalised steps can
    # blow that up in the pattern where the mask is ~0, so compare what the trigger does
    images = tiny_artifact.preprocess.resize(shots.images)
    assert torch.allclose(refined(images), again(images), atol=1e-4)
    assert torch.allclose(refined.mask, again.mask, atol=1e-5)
    assert refined.target == start.target and refined.mask.shape == start.mask.shape
    assert 0 <= refined.mask.min() and refined.mask.max() <= 1 and 0.0 <= flip_rate <= 1.0
    assert all(parameter.grad is None for parameter in prompts.parameters())  # the prompts are not trained

    def objective(trigger):
        others = shots.labels != trigger.target
        images = tiny_artifact.preprocess.resize(shots.images[others])
        with torch.no_grad():
            embedding = encoder(tiny_artifact.preprocess.normalize(trigger(images)), prompts).embedding
            logits = class_logits(embedding, F.normalize(tiny_artifact.text_features, dim=-1), 20.0)
        return (F.cross_entropy(logits, torch.full((len(images),), trigger.target))
                + 0.01 * trigger.mask.sum()).item()

    assert objective(refined) < objective(start)
    with pytest.raises(InputError, match="refinement steps"):
        refine_trigger(*arguments, steps=0, mask_weight=0.01)


@pytest.mark.parametrize("median_l1, stop, triggers", [(1e6, 1.0, [1, 2, 3]), (1e-3, 1.0, [1, 1, 1]),
                                                      (4.0, 1.0, [1, 1, 1]), (4.0, 100.0, [1, 2, 3])])
def test_refresh_adds_a_trigger_until_the_mask_is_no_longer_anomalous(tiny_artifact, shots, median_l1, stop,
                                                                      triggers):
    # epochs 1 and 2 refine the trigger (the start mask's L1 is 8); a refined mask above
    # stop x the median ends the refreshes
    _, history = _rvpt(tiny_artifact, shots, inversion=_inversion(median_l1), unlearn_weight=1.0,
                       unlearn_refresh=1, unlearn_refresh_steps=2, unlearn_refresh_stop=stop)
    assert [epoch["triggers"] for epoch in history] == triggers


@pytest.mark.parametrize("targets", ["labels", "frozen"])
def test_unlearning_loss_is_ce_on_labels_or_kl_to_the_frozen_clean_predictions(tiny_artifact, shots, targets):
    # lr 0 keeps the prompts at their start, so the first epoch's loss can be recomputed by hand
    # over the whole set in one batch
    inversion = _inversion(median_l1=1e6)
    prompts, history = _rvpt(tiny_artifact, shots, inversion=inversion, unlearn_weight=1.0, lr=0.0, epochs=1,
                             batch_size=len(shots), unlearn_targets=targets, distill_temperature=3.0)
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    text = F.normalize(tiny_artifact.text_features, dim=-1)
    resized = tiny_artifact.preprocess.resize(shots.images)
    with torch.no_grad():
        stamped = encoder(tiny_artifact.preprocess.normalize(inversion.trigger(resized)), prompts).embedding
        clean = encoder(tiny_artifact.preprocess.normalize(resized)).embedding  # frozen: no prompts
        stamped_logits, frozen_logits = class_logits(stamped, text, 20.0), class_logits(clean, text, 20.0)
    expected = (F.cross_entropy(stamped_logits, shots.labels) if targets == "labels"
                else distillation_loss(stamped_logits, frozen_logits, 3.0))
    assert history[0]["unlearn"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("overrides, match", [({"unlearn_refresh": -1}, "unlearn_refresh"),
                                              ({"unlearn_refresh_steps": 0}, "unlearn_refresh"),
                                              ({"unlearn_refresh_stop": 0.0}, "unlearn_refresh_stop"),
                                              ({"unlearn_refresh_stop": float("nan")}, "unlearn_refresh_stop"),
                                              ({"unlearn_targets": "soft"}, "unlearn_targets must be one of")])
def test_bad_refresh_settings_are_input_errors(tiny_artifact, shots, overrides, match):
    with pytest.raises(InputError, match=match):
        _rvpt(tiny_artifact, shots, inversion=_inversion(40.0), unlearn_weight=1.0, **overrides)


@pytest.mark.parametrize("extension", ["unlearn_weight", "distill_weight", "distill_mixup"])
@pytest.mark.parametrize("method", ["rvpt", "vpt", "rvpt+cbpt"])
def test_extensions_are_the_unlearn_methods_and_refused_elsewhere_before_anything_loads(tmp_path, extension,
                                                                                         method):
    from training.purify import purify

    with pytest.raises(InputError, match=f"'{extension}' is not a setting of {re.escape(method)}; it is a setting "
                                         "of unlearn: use --method unlearn"):
        purify("no-such-model", "digits", tmp_path / "out", method=method, settings={extension: 1.0})


def test_unlearn_options_are_rvpt_settings_not_cbpt_ones(tmp_path, capsys):
    from training import purify as purify_cli

    settings = ["unlearn_weight=1", "unlearn_steps=5", "unlearn_mask_weight=0.1", "unlearn_refresh=2",
                "unlearn_refresh_steps=5", "unlearn_refresh_stop=0.7", "unlearn_targets=frozen", "distill_weight=4",
                "distill_temperature=2", "distill_mixup=8"]
    overrides = [item for setting in settings for item in ("--set", setting)]
    code = purify_cli.main(["--method", "unlearn", "--model", str(tmp_path / "no-such-model"), "--data", "digits",
                            "--out", str(tmp_path / "out"), *overrides])
    error = capsys.readouterr().err
    assert code == 3 and "no-such-model" in error and "CBPT" not in error  # got as far as loading the model
