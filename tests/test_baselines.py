"""Baselines: linear probe, FT, CleanCLIP, no defense and VPT, in training/baselines.py and purify."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import guard
import training.purify as purify_module
from guard.artifact import load_artifact
from guard.errors import InputError
from training.models import load_clip, save_clip
from guard.prompted import PromptedVisionEncoder
from training.baselines import (FinetuneConfig, LinearProbeConfig, augment, cosine_logits, embed_images, finetune,
                                train_linear_probe)
from training.contrastive import ContrastiveConfig, train_contrastive
from training.data import few_shot, load_dataset
from training.evaluate import zero_shot_classifier
from training.purify import main, purify

from conftest import TINY_CFG

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_artifact, tmp_path_factory):
    return save_clip(tiny_artifact.clip, copy.deepcopy(TINY_CFG), tiny_artifact.preprocess,
                     tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def shots():
    return few_shot(load_dataset("digits", "train"), 4, seed=0)  # 40 images of 8 x 8


@pytest.fixture(scope="module")
def test_images():
    return load_dataset("digits", "test").images[:24]


def _state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before, module, prefix):
    """Whether any tensor whose name starts with `prefix` differs from `before`."""
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items()
               if name.startswith(prefix))


def _served_and_memory_logits(result, images):
    with guard.load(result.out, device="cpu") as served:
        served_logits = served.logits(list(images))
        manifest = served.manifest
        preprocess = served.preprocess
    with torch.no_grad():
        memory_logits, _ = result.classifier(preprocess(images))
    return served_logits, memory_logits, manifest


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_fits_the_shots_better_than_zero_shot_and_leaves_the_encoder(tiny_artifact, tokenizer, shots):
    clip, preprocess = tiny_artifact.clip, tiny_artifact.preprocess
    before = _state(clip)
    encoder = PromptedVisionEncoder(clip.visual)
    # the random tiny tower embeds all digits nearly alike (mean cosine 0.99): 200 epochs
    weights, history = train_linear_probe(encoder, 20.0, preprocess, shots, LinearProbeConfig(epochs=200))
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert weights.shape == (10, TINY_CFG["embed_dim"])
    assert history[-1]["loss"] < history[0]["loss"] / 2
    embeddings = embed_images(encoder, preprocess, shots.images, torch.device("cpu"))
    probe_accuracy = (cosine_logits(embeddings, weights, 20.0).argmax(1) == shots.labels).float().mean()
    loaded = SimpleNamespace(model=clip, tokenizer=tokenizer)  # what zero_shot_classifier reads
    with torch.no_grad():
        zero_shot, _ = zero_shot_classifier(loaded, shots.classes)(preprocess(shots.images))
    zero_shot_accuracy = (zero_shot.argmax(1) == shots.labels).float().mean()
    assert probe_accuracy > zero_shot_accuracy + 0.3  # measured: 0.57 against 0.10
    assert history[-1]["accuracy"] == pytest.approx(100 * probe_accuracy.item(), abs=15)


def test_linear_probe_follows_its_seed(tiny_artifact, shots):
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)

    def run(seed):
        config = LinearProbeConfig(epochs=3, seed=seed)
        return train_linear_probe(encoder, 20.0, tiny_artifact.preprocess, shots, config)[0]

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_linear_probe_artifact_serves_the_head_on_the_unchanged_tower(tiny_model_dir, tmp_path, test_images):
    result = purify(str(tiny_model_dir), "digits", tmp_path / "probe", method="linear-probe", shots=2,
                    pr_images=0, settings={"epochs": 5, "lr": 0.05})
    served_logits, memory_logits, manifest = _served_and_memory_logits(result, test_images)
    torch.testing.assert_close(served_logits, memory_logits, atol=1e-4, rtol=1e-4)
    assert manifest["method"]["name"] == "linear-probe" and manifest["visual_prompts"] is None
    assert manifest["method"]["hyperparameters"]["linear_probe"] == {**LinearProbeConfig().to_dict(),
                                                                     "epochs": 5, "lr": 0.05}
    base = load_clip(str(tiny_model_dir)).model
    artifact = load_artifact(result.out)
    assert all(torch.equal(value, artifact.vision_state[name]) for name, value in base.visual.state_dict().items())
    assert artifact.logit_scale == pytest.approx(base.logit_scale.exp().item())
    template = zero_shot_classifier(load_clip(str(tiny_model_dir)), load_dataset("digits", "test").classes)
    assert not torch.allclose(result.classifier.text_features, template.text_features, atol=1e-3)


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentations_keep_shape_and_range_and_follow_the_seed(dtype):
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    if dtype == torch.float32:
        images = images.float() / 255

    def draw(seed):
        return augment(images, torch.Generator().manual_seed(seed))

    out = draw(0)
    assert out.shape == images.shape and out.dtype == dtype
    assert out.float().min() >= 0 and out.float().max() <= (255 if dtype == torch.uint8 else 1)
    assert torch.equal(out, draw(0))
    assert not torch.equal(out, draw(1))
    assert not torch.equal(out, images)


def test_augmentation_without_crop_or_jitter_is_the_image_or_its_mirror():
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = augment(images, torch.Generator().manual_seed(2), min_scale=1.0, aspect=(1.0, 1.0), jitter=0.0)
    same = (out - images).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - images.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()
    unflipped = augment(images, torch.Generator().manual_seed(2), min_scale=1.0, aspect=(1.0, 1.0), jitter=0.0,
                        flip=False)
    torch.testing.assert_close(unflipped, images, atol=1e-5, rtol=0)


def test_augment_rejects_integer_images_other_than_uint8():
    with pytest.raises(InputError, match="uint8 or float"):
        augment(torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.Generator())


# --------------------------------------------------------------------------- FT and CleanCLIP


def _fresh_clip(tiny_artifact):
    clip = copy.deepcopy(tiny_artifact.clip)
    clip.requires_grad_(True)  # other tests' PromptedVisionEncoder / TextEncoder froze the towers
    return clip


FAST_FT = dict(epochs=2, batch_size=16, lr=1e-3)


def test_ft_is_exactly_train_contrastive(tiny_artifact, tokenizer, shots):
    ours, reference = _fresh_clip(tiny_artifact), _fresh_clip(tiny_artifact)
    history = finetune(ours, tokenizer, tiny_artifact.preprocess, shots, FinetuneConfig(**FAST_FT))
    losses = train_contrastive(reference, tokenizer, tiny_artifact.preprocess, shots,
                               ContrastiveConfig(weight_decay=0.1, warmup_fraction=0.1, seed=0, **FAST_FT))
    assert all(torch.equal(value, reference.state_dict()[name]) for name, value in ours.state_dict().items())
    assert len(history) == 2 and history[0]["loss"] == pytest.approx(sum(losses[:2]) / 2, rel=1e-6)
    assert all(epoch["image_ss"] == 0 and epoch["text_ss"] == 0 for epoch in history)


def test_cleanclip_trains_both_towers_with_in_modality_losses(tiny_artifact, tokenizer, shots):
    clip = _fresh_clip(tiny_artifact)
    clip.visual.requires_grad_(False)  # flags are restored after training
    before = _state(clip)
    config = FinetuneConfig(self_supervised_weight=1.0, **FAST_FT)
    history = finetune(clip, tokenizer, tiny_artifact.preprocess, shots, config)
    assert _changed(before, clip, "visual.") and _changed(before, clip, "transformer.")
    assert _changed(before, clip, "text_projection")
    assert not any(p.requires_grad for p in clip.visual.parameters())
    assert all(p.requires_grad for p in clip.transformer.parameters())
    for epoch in history:
        assert epoch["image_ss"] > 0 and epoch["text_ss"] > 0
        assert epoch["loss"] == pytest.approx(epoch["multimodal"] + epoch["image_ss"] + epoch["text_ss"], rel=1e-5)
    again = _fresh_clip(tiny_artifact)
    finetune(again, tokenizer, tiny_artifact.preprocess, shots, config)
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in clip.state_dict().items())
    plain = _fresh_clip(tiny_artifact)
    finetune(plain, tokenizer, tiny_artifact.preprocess, shots, FinetuneConfig(**FAST_FT))
    assert not torch.equal(plain.visual.proj, clip.visual.proj)


@pytest.mark.parametrize("overrides, match", [
    ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"self_supervised_weight": -1.0}, "self_supervised_weight"),
    ({"min_crop_scale": 0.0}, "min_crop_scale"), ({"jitter": 1.0}, "jitter"), ({"batch_size": 0}, "batch_size")])
def test_bad_finetune_settings_are_input_errors(overrides, match):
    with pytest.raises(InputError, match=match):
        FinetuneConfig(**overrides)


def test_bad_probe_settings_are_input_errors():
    with pytest.raises(InputError, match="momentum"):
        LinearProbeConfig(momentum=1.0)
    with pytest.raises(InputError, match="unknown linear-probe settings"):
        LinearProbeConfig.with_overrides(alpha=2.0)
    with pytest.raises(InputError, match="unknown FT settings"):
        FinetuneConfig.with_overrides(momentum=0.9)


@pytest.fixture(scope="module")
def ft_runs(tiny_model_dir, tmp_path_factory):
    """purify with ft, cleanclip and cleanclip at weight 0, on the same tiny model."""
    out = tmp_path_factory.mktemp("ft")
    settings = {"epochs": 2, "lr": 1e-3, "batch_size": 8}
    return {name: purify(str(tiny_model_dir), "digits", out / name, method=method, shots=2, pr_images=0,
                         settings={**settings, **extra})
            for name, method, extra in [("ft", "ft", {}), ("cleanclip", "cleanclip", {}),
                                        ("cleanclip-0", "cleanclip", {"self_supervised_weight": 0.0})]}


@pytest.mark.parametrize("name", ["ft", "cleanclip"])
def test_finetuned_artifact_serves_the_finetuned_towers(ft_runs, tiny_model_dir, test_images, name):
    result = ft_runs[name]
    served_logits, memory_logits, manifest = _served_and_memory_logits(result, test_images)
    torch.testing.assert_close(served_logits, memory_logits, atol=1e-4, rtol=1e-4)
    assert manifest["method"]["name"] == name and manifest["visual_prompts"] is None
    recorded = manifest["method"]["hyperparameters"]["finetune"]
    assert recorded["self_supervised_weight"] == (1.0 if name == "cleanclip" else 0.0) and recorded["lr"] == 1e-3
    base = load_clip(str(tiny_model_dir))
    artifact = load_artifact(result.out)
    base_visual = base.model.visual.state_dict()
    assert any(not torch.equal(value, artifact.vision_state[key]) for key, value in base_visual.items())
    template = zero_shot_classifier(base, load_dataset("digits", "test").classes).text_features
    assert not torch.allclose(artifact.text_features, template, atol=1e-4)  # re-embedded by the tuned text tower


def test_cleanclip_at_weight_zero_is_ft(ft_runs):
    ft, zero, cleanclip = (load_artifact(ft_runs[name].out) for name in ("ft", "cleanclip-0", "cleanclip"))
    assert all(torch.equal(value, zero.vision_state[key]) for key, value in ft.vision_state.items())
    assert torch.equal(ft.text_features, zero.text_features) and ft.logit_scale == zero.logit_scale
    assert not torch.equal(ft.text_features, cleanclip.text_features)
    assert ft_runs["ft"].after == ft_runs["cleanclip-0"].after


# --------------------------------------------------------------------------- none and VPT


def test_no_defense_serves_the_zero_shot_model(tiny_model_dir, tmp_path, test_images):
    result = purify(str(tiny_model_dir), "digits", tmp_path / "none", method="none", shots=2, pr_images=0)
    assert result.after is result.before
    served_logits, _, manifest = _served_and_memory_logits(result, test_images)
    loaded = load_clip(str(tiny_model_dir))
    zero_shot = zero_shot_classifier(loaded, load_dataset("digits", "test").classes)
    with torch.no_grad():
        expected, _ = zero_shot(loaded.preprocess(test_images))
    torch.testing.assert_close(served_logits, expected, atol=1e-4, rtol=1e-4)
    assert manifest["visual_prompts"] is None
    assert manifest["method"]["hyperparameters"] == {"shots": 2, "data": "digits"}


def test_vpt_is_rvpt_with_alpha_zero(tiny_model_dir, tmp_path, test_images):
    result = purify(str(tiny_model_dir), "digits", tmp_path / "vpt", method="vpt", shots=2, pr_images=0,
                    settings={"epochs": 1, "num_tokens": 2, "start_block": 2})
    served_logits, memory_logits, manifest = _served_and_memory_logits(result, test_images)
    torch.testing.assert_close(served_logits, memory_logits, atol=1e-4, rtol=1e-4)
    recorded = manifest["method"]["hyperparameters"]
    assert manifest["method"]["name"] == "vpt" and recorded["alpha"] == 0.0 and recorded["num_tokens"] == 2
    assert manifest["visual_prompts"]["num_tokens"] == 2
    assert manifest["metrics"]["final_epoch"]["fr"] == 0.0


# --------------------------------------------------------------------------- purify's options


@pytest.mark.parametrize("method, options, match", [
    ("vpt", {"settings": {"alpha": 2.0}}, "'alpha' is not a setting of vpt; it is a setting of rvpt, unlearn"),
    ("linear-probe", {"settings": {"alpha": 2.0}}, "'alpha' is not a setting of linear-probe"),
    ("none", {"settings": {"lr": 0.1}}, "'lr' is not a setting of none"),
    ("ft", {"settings": {"init_std": 0.1}}, "it is a setting of linear-probe: use --method linear-probe"),
    ("linear-probe", {"settings": {"warmup_fraction": 0.2}}, "it is a setting of ft, cleanclip"),
    ("vpt", {"settings": {"self_supervised_weight": 1.0}}, "--method cleanclip"),
    ("none", {"settings": {"rho": 0.1}}, "it is a setting of cbpt"),
    ("ft", {"settings": {"self_supervised_weight": 1.0}}, "cleanclip"),
    ("ft", {"settings": {"lr": 0.0}}, "lr"),
    ("linear-probe", {"settings": {"momentum": 2.0}}, "momentum"),
    ("linear-probe", {"settings": {"epochs": "3"}}, "linear-probe setting 'epochs' must be int, got '3'"),
    ("linear-probe", {"settings": {"epochs": 2.5}}, "must be int"),
    ("rvpt", {"settings": {"seed": 1}}, "--seed"),
    ("rvpt", {"settings": {"unlearn_weight": 1.0}}, "--method unlearn"),
    ("magic", {}, "unknown method 'magic'"),
    ("none", {"test_limit": 0}, "test_limit"),
    ("none", {"test_limit": True}, "test_limit"),
    ("none", {"before": {"ca": 1.0}}, "Evaluation"),
])
def test_bad_and_stray_options_are_input_errors_before_anything_loads(tmp_path, method, options, match):
    with pytest.raises(InputError, match=match):
        purify("no-such-model", "digits", tmp_path / "out", method=method, **options)


def test_stray_options_on_the_command_line_exit_2(tmp_path, capsys):
    base = ["--model", "no-such-model", "--data", "digits", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(["--method", "vpt", "--set", "alpha=2", *base]) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["--method", "ft", "--set", "init_std=0.1", *base]) == 2
    assert main(["--method", "linear-probe", "--set", "self_supervised_weight=1", *base]) == 2
    assert main(["--method", "none", "--set", "test_limit=0", *base]) == 2


def test_before_is_reused_and_test_limit_evaluates_that_many_images(tiny_model_dir, tmp_path, monkeypatch):
    first = purify(str(tiny_model_dir), "digits", tmp_path / "none", method="none", shots=2, pr_images=5,
                   test_limit=50)
    assert first.before.num_images == 50 and first.before.num_pr_images == 5
    calls = []
    evaluate = purify_module.evaluate
    monkeypatch.setattr(purify_module, "evaluate", lambda *args, **kwargs: calls.append(1) or evaluate(*args, **kwargs))
    second = purify(str(tiny_model_dir), "digits", tmp_path / "probe", method="linear-probe", shots=2,
                    pr_images=5, test_limit=50, before=first.before, settings={"epochs": 2})
    assert second.before is first.before and len(calls) == 1  # only the "after" evaluation ran
    assert second.after.num_images == 50
    manifest = load_artifact(second.out).manifest
    assert manifest["metrics"]["before"] == first.before.to_dict()
    with pytest.raises(InputError, match="same test_limit"):
        purify(str(tiny_model_dir), "digits", tmp_path / "x", method="none", shots=2, pr_images=0, test_limit=40,
               before=first.before)


def test_command_line_runs_a_baseline_with_a_test_limit(tiny_model_dir, tmp_path):
    out, report = tmp_path / "probe", tmp_path / "probe.json"
    assert main(["--method", "linear-probe", "--model", str(tiny_model_dir), "--data", "digits", "--shots", "2",
                 "--out", str(out), "--set", "pr_images=0", "--set", "test_limit=30", "--set", "epochs=3",
                 "--set", "lr=0.05", "--json", str(report), "--no-progress"]) == 0
    summary = json.loads(report.read_text())
    assert summary["before"]["num_images"] == summary["after"]["num_images"] == 30
    recorded = load_artifact(out).manifest["method"]["hyperparameters"]["linear_probe"]
    assert (recorded["epochs"], recorded["lr"], recorded["batch_size"]) == (3, 0.05, 32)


def test_the_probe_classifier_holds_the_normalised_head(tiny_model_dir, tmp_path):
    """The stored head is W itself; the classifier holds normalize(W) (PromptedCLIP's rule)."""
    result = purify(str(tiny_model_dir), "digits", tmp_path / "probe", method="linear-probe", shots=2,
                    pr_images=0, settings={"epochs": 1})
    stored = load_artifact(result.out).text_features
    torch.testing.assert_close(result.classifier.text_features, F.normalize(stored, dim=-1))
