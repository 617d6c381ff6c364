"""CBPT: trigger inversion, positive selection, the losses, the training loop and purify's artifacts."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import guard
from guard._compat import import_open_clip
from guard.errors import InputError
from training.models import load_clip, save_clip
from guard.prompted import PromptedCLIP, PromptedVisionEncoder
from training.text import TextEncoder, class_text_features
from training.cbpt import (CBPTConfig, cbpt_losses, contrastive_inversion_loss, invert_triggers,
                           most_similar_wrong_class, project_l2, purified_text_features,
                           select_positives, train_cbpt)
from training.data import ImageDataset, load_dataset
from training.purify import purify

from conftest import TINY_CFG

open_clip = import_open_clip()
CLASSES = ("t-shirt", "trouser", "bag", "ankle boot")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def few_shot_set():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageDataset("synthetic", images, torch.arange(12) % 4, CLASSES)


def _embedder(clip, preprocess):
    encoder = PromptedVisionEncoder(clip.visual).eval()
    return lambda pixels: encoder(preprocess.normalize(pixels)).embedding.float()


# --------------------------------------------------------------------------- inner loop


def test_projection_keeps_short_deltas_and_shrinks_long_ones():
    delta = torch.zeros(3, 2, 2, 2)
    delta[0, 0, 0, 0] = 0.5  # norm 0.5: inside a ball of 1
    delta[1] = 1.0           # norm sqrt(8)
    projected = project_l2(delta, 1.0)
    assert torch.equal(projected[0], delta[0]) and torch.equal(projected[2], delta[2])
    assert projected[1].norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(projected[1], delta[1] / math.sqrt(8))


@pytest.mark.parametrize("rho", [6 / 255, 0.5])
def test_inversion_stays_in_the_ball_and_lowers_the_contrastive_loss(tiny_artifact, rho):
    embed = _embedder(tiny_artifact.clip, tiny_artifact.preprocess)
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean, positive = embed(pixels), embed(pixels.flip(0))
    delta, perturbed, trace = invert_triggers(embed, pixels, clean, positive, rho=rho, steps=10, lr=0.1)
    assert delta.shape == pixels.shape
    assert (delta.flatten(1).norm(dim=1) <= rho * (1 + 1e-5)).all()
    # delta = 0: s(f(v), f(v)) - s(f(v), f(v_pos)) = 1 - s(f(v), f(v_pos))
    assert trace[0] == pytest.approx((1 - F.cosine_similarity(clean, positive)).mean().item(), abs=1e-5)
    assert len(trace) == 11 and trace[-1] < trace[0]
    with torch.no_grad():
        torch.testing.assert_close(perturbed, embed((pixels + delta).clamp(0, 1)))
    assert contrastive_inversion_loss(perturbed, clean, positive).mean().item() == pytest.approx(trace[-1], abs=1e-6)


def test_inversion_treats_every_image_on_its_own(tiny_artifact):
    embed = _embedder(tiny_artifact.clip, tiny_artifact.preprocess)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean, positive = embed(pixels), embed(pixels.roll(1, 0))
    batched, _, _ = invert_triggers(embed, pixels, clean, positive, rho=0.3, steps=5, lr=0.1)
    alone, _, _ = invert_triggers(embed, pixels[2:3], clean[2:3], positive[2:3], rho=0.3, steps=5, lr=0.1)
    torch.testing.assert_close(batched[2:3], alone, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- positives


@pytest.mark.parametrize("mode", ["farthest", "closest"])
def test_positive_selection_matches_brute_force(mode):
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(7, 5, generator=generator)
    shot_features = torch.randn(15, 5, generator=generator)
    shot_labels = torch.arange(15) % 3
    wrong = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    chosen = select_positives(features, wrong, shot_features, shot_labels, mode)
    for n in range(len(features)):
        candidates = [j for j in range(15) if shot_labels[j] == wrong[n]]
        cosines = [F.cosine_similarity(features[n], shot_features[j], dim=0).item() for j in candidates]
        pick = min if mode == "farthest" else max
        assert chosen[n].item() == candidates[cosines.index(pick(cosines))]


def test_random_positives_stay_in_the_wrong_class_and_follow_the_seed():
    features, shot_features = torch.randn(40, 4), torch.randn(12, 4)
    shot_labels, wrong = torch.arange(12) % 3, torch.arange(40) % 3

    def draw(seed):
        return select_positives(features, wrong, shot_features, shot_labels, "random",
                                torch.Generator().manual_seed(seed))

    chosen = draw(0)
    assert torch.equal(shot_labels[chosen], wrong)
    assert torch.equal(chosen, draw(0))
    assert len(set(chosen[wrong == 0].tolist())) > 1  # not always the same shot


def test_most_similar_wrong_class_skips_the_true_class():
    logits = torch.tensor([[5.0, 3.0, 4.0], [1.0, 2.0, 0.0], [0.0, 0.5, 0.7]])
    assert most_similar_wrong_class(logits, torch.tensor([0, 0, 2])).tolist() == [2, 1, 1]


def test_a_wrong_class_without_shots_is_an_input_error():
    with pytest.raises(InputError, match="shots"):
        select_positives(torch.randn(1, 3), torch.tensor([2]), torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))


# --------------------------------------------------------------------------- losses


def test_losses_match_a_hand_computation():
    clean = torch.tensor([[math.log(2.0), 0.0, 0.0]])      # p = 1/2, 1/4, 1/4
    perturbed = torch.tensor([[0.0, math.log(3.0), 0.0]])  # p = 1/5, 3/5, 1/5
    label, wrong = torch.tensor([0]), torch.tensor([1])
    config = CBPTConfig(trigger_weight=0.5)
    losses = cbpt_losses(clean, perturbed, label, wrong, config, warmup=False)
    bn = -math.log(1 / 2) - 0.5 * math.log(1 / 5)
    adv = -math.log(1 - 3 / 5)
    align = 0.5 * ((1 / 2 - 1 / 5) ** 2 + (1 / 4 - 3 / 5) ** 2 + (1 / 4 - 1 / 5) ** 2) / 3
    assert losses.bn.item() == pytest.approx(bn, rel=1e-5)
    assert losses.adv.item() == pytest.approx(adv, rel=1e-5)
    assert losses.align.item() == pytest.approx(align, rel=1e-5)
    assert losses.total.item() == pytest.approx(bn + 0.4 * adv + 0.4 * align, rel=1e-5)
    warm = cbpt_losses(clean, perturbed, label, wrong, config, warmup=True)
    assert warm.total.item() == pytest.approx(bn, rel=1e-5)


def test_losses_average_over_the_batch():
    generator = torch.Generator().manual_seed(5)
    clean, perturbed = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels, wrong = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    config = CBPTConfig()
    batch = cbpt_losses(clean, perturbed, labels, wrong, config, warmup=False)
    single = [cbpt_losses(clean[i:i + 1], perturbed[i:i + 1], labels[i:i + 1], wrong[i:i + 1], config, False)
              for i in range(4)]
    for name in ("total", "bn", "adv", "align"):
        expected = sum(getattr(loss, name).item() for loss in single) / 4
        assert getattr(batch, name).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- training


def _train(tiny_artifact, tokenizer, shots, **overrides):
    clip = tiny_artifact.clip
    settings = dict(epochs=3, warmup_epochs=1, batch_size=4, lr=0.5, rho=0.3, inversion_steps=3)
    config = CBPTConfig(**{**settings, **overrides})
    return train_cbpt(PromptedVisionEncoder(clip.visual), TextEncoder(clip), tokenizer, CLASSES,
                      tiny_artifact.logit_scale, tiny_artifact.preprocess, shots, config)


def test_training_moves_only_the_contexts_and_warms_up_with_l_bn(tiny_artifact, tokenizer, few_shot_set):
    clip = tiny_artifact.clip
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    context, history = _train(tiny_artifact, tokenizer, few_shot_set)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert [epoch["warmup"] for epoch in history] == [True, False, False]
    assert history[0]["loss"] == pytest.approx(history[0]["bn"], rel=1e-6)
    for epoch in history[1:]:
        assert epoch["adv"] > 0
        assert epoch["loss"] == pytest.approx(epoch["bn"] + 0.4 * epoch["adv"] + 0.4 * epoch["align"], rel=1e-5)
    assert all(epoch["cl_end"] < epoch["cl_start"] for epoch in history)
    template = class_text_features(TextEncoder(clip), tokenizer, CLASSES)
    assert not torch.allclose(purified_text_features(TextEncoder(clip), context), template, atol=1e-3)


def test_warm_up_epochs_train_with_l_bn_alone(tiny_artifact, tokenizer, few_shot_set):
    """All epochs in warm-up: the other weights cannot matter, so the contexts are identical."""
    first, _ = _train(tiny_artifact, tokenizer, few_shot_set, warmup_epochs=3)
    second, _ = _train(tiny_artifact, tokenizer, few_shot_set, warmup_epochs=3, adv_weight=5.0, align_weight=7.0)
    assert torch.equal(first.context, second.context)
    third, _ = _train(tiny_artifact, tokenizer, few_shot_set, warmup_epochs=2, adv_weight=5.0, align_weight=7.0)
    assert not torch.equal(first.context, third.context)


@pytest.mark.parametrize("overrides, match", [
    ({"num_context": 0}, "num_context"), ({"position": "side"}, "position"), ({"positive": "median"}, "positive"),
    ({"warmup_epochs": 21}, "warmup_epochs"), ({"epochs": 0}, "epochs"), ({"rho": -0.1}, "rho"),
    ({"lr": 0.0}, "learning rates"), ({"inversion_lr": -1.0}, "learning rates"),
    ({"adv_weight": -0.4}, "weights"), ({"trigger_weight": float("nan")}, "weights"),
    ({"batch_size": 0}, "batch_size"), ({"logit_scale": 0.0}, "logit_scale")])
def test_bad_config_values_are_input_errors(overrides, match):
    with pytest.raises(InputError, match=match):
        CBPTConfig(**overrides)


def test_unknown_settings_and_stray_method_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown CBPT settings"):
        CBPTConfig.with_overrides(alpha=2.0)
    # all raised before any model or data is loaded
    with pytest.raises(InputError, match="'num_tokens' is not a setting of cbpt; it is a setting of"):
        purify("no-such-model", "digits", tmp_path / "out", method="cbpt", settings={"num_tokens": 3})
    with pytest.raises(InputError, match="'rho' is not a setting of rvpt; it is a setting of cbpt"):
        purify("no-such-model", "digits", tmp_path / "out", method="rvpt", settings={"rho": 0.1})
    with pytest.raises(InputError, match="did you mean rvpt.epochs or cbpt.epochs"):
        purify("no-such-model", "digits", tmp_path / "out", method="rvpt+cbpt", settings={"epochs": 3})
    with pytest.raises(InputError, match="schedule"):
        purify("no-such-model", "digits", tmp_path / "out", method="rvpt+cbpt", settings={"schedule": "both"})
    with pytest.raises(InputError, match="positive"):
        purify("no-such-model", "digits", tmp_path / "out", method="cbpt", settings={"positive": "nearest"})


# --------------------------------------------------------------------------- purify and serving


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_artifact, tmp_path_factory):
    cfg = copy.deepcopy(TINY_CFG)
    return save_clip(tiny_artifact.clip, cfg, tiny_artifact.preprocess, tmp_path_factory.mktemp("clip") / "tiny")


@pytest.mark.parametrize("method, schedule", [("cbpt", None), ("rvpt+cbpt", "sequential"),
                                              ("rvpt+cbpt", "joint")])
def test_purified_artifact_serves_the_learned_class_embeddings(tiny_model_dir, tmp_path, method, schedule):
    cbpt = {"epochs": 2, "warmup_epochs": 1, "lr": 0.5, "inversion_steps": 2, "rho": 0.3}
    rvpt = {"epochs": 1, "num_tokens": 2, "start_block": 2}
    settings = cbpt if method == "cbpt" else {"schedule": schedule, "rvpt": rvpt, "cbpt": cbpt}
    result = purify(str(tiny_model_dir), "digits", tmp_path / "purified", method=method, shots=2,
                    pr_images=0, settings=settings)
    images = load_dataset("digits", "test").images[:24]
    with guard.load(result.out, device="cpu") as served:
        assert served.manifest["method"]["name"] == method
        assert (served.manifest["visual_prompts"] is None) == (method == "cbpt")
        served_logits = served.logits(list(images))
    preprocess = served.preprocess
    with torch.no_grad():
        memory_logits, _ = result.classifier(preprocess(images))
    torch.testing.assert_close(served_logits, memory_logits, atol=1e-4, rtol=1e-4)
    # the stored class embeddings are the learned ones, not the template's
    loaded = load_clip(str(tiny_model_dir))
    classes = load_dataset("digits", "test").classes
    template = class_text_features(TextEncoder(loaded.model), loaded.tokenizer, classes)
    assert not torch.allclose(result.classifier.text_features, template, atol=1e-3)
    assert isinstance(result.classifier, PromptedCLIP)
    assert result.train_seconds is not None and result.train_seconds > 0

