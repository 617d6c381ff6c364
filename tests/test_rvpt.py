"""RVPT: the feature-repelling loss, the scaled defaults and the training loop."""
import pytest
import torch

from guard._compat import import_open_clip
from guard.errors import InputError
from guard.prompted import PromptedVisionEncoder, class_logits
from training.data import ImageDataset
from training.rvpt import (RVPTConfig, distillation_loss, feature_repelling_loss, mix_pairs, repelling_cosine,
                           train_rvpt)

open_clip = import_open_clip()


def test_feature_repelling_loss_is_the_clamped_mean_cosine():
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert feature_repelling_loss(a, a, margin=-1.0).item() == pytest.approx(1.0)
    assert feature_repelling_loss(a, -a, margin=-1.0).item() == pytest.approx(-1.0)
    b = torch.tensor([[[0.0, 1.0]], [[0.0, -1.0]]])  # cosines 0 and -1
    assert feature_repelling_loss(a, b, margin=-1.0).item() == pytest.approx(-0.5)
    assert feature_repelling_loss(a, b, margin=-0.2).item() == pytest.approx(-0.1)
    assert feature_repelling_loss(a, -a, margin=1.0).item() == pytest.approx(1.0)  # m = 1 disables repulsion


def test_defaults_are_the_papers_for_vit_b32_and_scaled_for_the_tiny_model():
    vit_b32 = open_clip.model._build_vision_tower(512, open_clip.get_model_config("ViT-B-32")["vision_cfg"])
    config = RVPTConfig.for_encoder(PromptedVisionEncoder(vit_b32))
    assert (config.start_block, config.num_tokens, config.alpha, config.margin) == (3, 50, 2.0, -1.0)
    assert (config.epochs, config.batch_size, config.lr, config.momentum) == (50, 32, 0.002, 0.9)
    assert 9 * 50 * 768 == PromptedVisionEncoder(vit_b32).new_prompts(3, 50).tokens.numel() == 345_600
    from training.zoo import reference_model_cfg
    tiny = open_clip.model._build_vision_tower(128, reference_model_cfg()["vision_cfg"])
    scaled = RVPTConfig.for_encoder(PromptedVisionEncoder(tiny), alpha=0.0, epochs=None)
    assert (scaled.start_block, scaled.num_tokens, scaled.alpha, scaled.epochs) == (0, 16, 0.0, 50)
    with pytest.raises(InputError, match="unknown RVPT setting.*'epoch'"):  # a misspelling is not ignored
        RVPTConfig.for_encoder(PromptedVisionEncoder(tiny), epoch=3)


@pytest.fixture()
def few_shot_set():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageDataset("synthetic", images, torch.arange(12) % 4, ("a", "b", "c", "d"))


def _train(tiny_artifact, few_shot_set, **overrides):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    config = RVPTConfig(start_block=1, num_tokens=4, **{"epochs": 6, "batch_size": 4, "lr": 0.5, **overrides})
    return encoder, train_rvpt(encoder, tiny_artifact.text_features, 20.0, tiny_artifact.preprocess,
                               few_shot_set, config)


def test_training_repels_and_fits_while_clip_stays_frozen(tiny_artifact, few_shot_set):
    before = {k: v.clone() for k, v in tiny_artifact.clip.state_dict().items()}
    encoder, (prompts, history) = _train(tiny_artifact, few_shot_set)
    assert history[-1]["fr"] < history[0]["fr"]
    assert history[-1]["ce"] < history[0]["ce"]
    assert all(torch.equal(before[k], v) for k, v in tiny_artifact.clip.state_dict().items())
    assert prompts.tokens.shape == (2, 4, encoder.width)


def test_training_is_reproducible_and_alpha_zero_is_plain_vpt(tiny_artifact, few_shot_set):
    _, (first, _) = _train(tiny_artifact, few_shot_set)
    _, (second, _) = _train(tiny_artifact, few_shot_set)
    assert torch.equal(first.tokens, second.tokens)
    _, (vpt, history) = _train(tiny_artifact, few_shot_set, alpha=0.0)
    assert all(epoch["fr"] == 0.0 for epoch in history)
    assert not torch.equal(vpt.tokens, first.tokens)


def test_repelling_cosine_is_the_fr_term_of_the_learnt_prompts(tiny_artifact, few_shot_set):
    encoder, (prompts, _) = _train(tiny_artifact, few_shot_set)
    preprocess = tiny_artifact.preprocess
    with torch.no_grad():
        prompted, frozen = encoder.forward_with_reference(
            preprocess.normalize(preprocess.resize(few_shot_set.images)), prompts)
    expected = feature_repelling_loss(prompted.block_cls, frozen.block_cls, margin=-1.0).item()
    # in batches of 5: the last one is short and still weighs per image
    measured = repelling_cosine(encoder, prompts, preprocess, few_shot_set.images, batch_size=5)
    assert measured == pytest.approx(expected, abs=1e-5)
    _, (vpt, _) = _train(tiny_artifact, few_shot_set, alpha=0.0)
    assert measured < repelling_cosine(encoder, vpt, preprocess, few_shot_set.images)  # RVPT repels, VPT does not


def test_distillation_loss_is_the_scaled_kl_from_teacher_to_student():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    p, q = torch.softmax(teacher / 2, dim=-1), torch.softmax(student / 2, dim=-1)
    expected = 4 * (p * (p / q).log()).sum(-1).mean()
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def _distance_from_frozen(tiny_artifact, few_shot_set, encoder, prompts):
    """KL(frozen || prompted) of the shots' class probabilities."""
    images = tiny_artifact.preprocess.normalize(tiny_artifact.preprocess.resize(few_shot_set.images))
    text = torch.nn.functional.normalize(tiny_artifact.text_features, dim=-1)
    with torch.no_grad():
        prompted, frozen = (class_logits(encoder(images, p).embedding, text, 20.0) for p in (prompts, None))
    return distillation_loss(prompted, frozen, 1.0).item()


def test_distillation_keeps_the_prompts_close_to_the_frozen_model(tiny_artifact, few_shot_set):
    encoder, (plain, plain_history) = _train(tiny_artifact, few_shot_set, alpha=0.0)
    assert all(epoch["distill"] == 0.0 for epoch in plain_history)  # off by default
    _, (distilled, history) = _train(tiny_artifact, few_shot_set, alpha=0.0, distill_weight=10.0)
    assert history[0]["distill"] > 0.0
    assert _distance_from_frozen(tiny_artifact, few_shot_set, encoder, distilled) \
        < _distance_from_frozen(tiny_artifact, few_shot_set, encoder, plain)
    # with repulsion on too, distillation changes the result
    _, (repelled, _) = _train(tiny_artifact, few_shot_set)
    _, (repelled_distilled, _) = _train(tiny_artifact, few_shot_set, distill_weight=10.0)
    assert not torch.equal(repelled.tokens, repelled_distilled.tokens)


def test_mix_pairs_blends_every_image_with_one_partner_of_the_batch():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)  # image i is all i
    mixed = mix_pairs(images, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    partner, weight = torch.randperm(5, generator=generator), torch.rand(5, generator=generator)
    assert torch.allclose(mixed[:, 0, 0, 0], weight * torch.arange(5.0) + (1 - weight) * partner)
    assert torch.equal(mixed, mixed[:, :1].expand_as(mixed))  # one weight per image, all pixels alike
    assert torch.equal(mixed, mix_pairs(images, torch.Generator().manual_seed(3)))


def test_mixup_distillation_is_the_kl_to_the_frozen_model_on_the_mixed_shots(tiny_artifact, few_shot_set):
    # lr 0 keeps the prompts at their start: the first epoch's loss, one batch of all shots, by hand
    encoder, (prompts, history) = _train(tiny_artifact, few_shot_set, alpha=0.0, lr=0.0, epochs=1,
                                         batch_size=len(few_shot_set), distill_mixup=2.0, distill_temperature=3.0)
    generator = torch.Generator().manual_seed(0)  # the config's seed: batch order, then the mixing
    order = torch.randperm(len(few_shot_set), generator=generator)
    mixed = mix_pairs(tiny_artifact.preprocess.resize(few_shot_set.images[order]), generator)
    images = tiny_artifact.preprocess.normalize(mixed)
    text = torch.nn.functional.normalize(tiny_artifact.text_features, dim=-1)
    with torch.no_grad():
        student, teacher = (class_logits(encoder(images, p).embedding, text, 20.0) for p in (prompts, None))
    assert history[0]["mixup"] == pytest.approx(distillation_loss(student, teacher, 3.0).item(), rel=1e-4)
    assert history[0]["mixup"] > 0.0
    assert history[0]["loss"] == pytest.approx(history[0]["ce"] + 2.0 * history[0]["mixup"], rel=1e-5)
    _, (_, plain) = _train(tiny_artifact, few_shot_set, alpha=0.0, epochs=1)
    assert plain[0]["mixup"] == 0.0  # off by default


@pytest.mark.parametrize("overrides", [{"distill_weight": -1.0}, {"distill_temperature": 0.0},
                                       {"distill_weight": float("nan")}, {"distill_mixup": -1.0},
                                       {"distill_mixup": float("nan")}])
def test_bad_distillation_settings_are_input_errors(overrides):
    with pytest.raises(InputError, match="distill"):
        RVPTConfig(start_block=0, num_tokens=4, **overrides)
