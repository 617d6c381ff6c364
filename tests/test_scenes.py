"""training.scenes: the web corpus (rendering, captions and which image each caption is
true of), the downstream task, and the pair source that contrastive training reads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from guard._compat import import_open_clip
from training.contrastive import ContrastiveConfig, train_contrastive
from training.data import FASHION_MNIST_CLASSES, load_dataset
from training.scenes import (CAPTION_TEMPLATES, COLOURS, DOWNSTREAM_SPLIT, PATTERNS, PHOTOS, SIDE, SIZES, ScenePairs,
                             _paste, _photograph, render_downstream, render_once, render_web, web_pairs)

if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not os.environ.get("CLIP_GUARD_REQUIRE_DATA"):
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True)


@pytest.fixture(scope="module")
def objects():
    train = load_dataset("fashion-mnist", "train")
    return train.images[:64], train.labels[:64]


@pytest.fixture(scope="module")
def tokenizer():
    return import_open_clip().tokenizer.SimpleTokenizer(context_length=24)


def test_rendering_is_seeded_and_varies_between_draws(objects):
    images, _ = objects
    first = render_web(images, torch.Generator().manual_seed(3))
    again = render_web(images, torch.Generator().manual_seed(3))
    other = render_web(images, torch.Generator().manual_seed(4))
    assert first.images.shape == (64, 3, SIDE, SIDE)
    assert 0 <= first.images.min() and first.images.max() <= 1
    assert torch.equal(first.images, again.images) and torch.equal(first.pattern, again.pattern)
    assert (first.images - other.images).abs().mean() > 0.1
    # every nuisance takes several values over 64 scenes, each an index into its word list
    for values, count in ((first.size, len(SIZES)), (first.colour, len(COLOURS)), (first.pattern, len(PATTERNS)),
                          (first.photo, len(PHOTOS))):
        assert len(values.unique()) > 1 and 0 <= values.min() and values.max() < count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scenes_painted_on_a_gpu_are_the_cpu_scenes(objects, tokenizer):
    """Pretraining on a GPU paints its scenes there; the draws stay on the CPU generator,
    so the corpus is the same on either device."""
    images, labels = objects
    on_cpu = render_web(images, torch.Generator().manual_seed(3))
    on_gpu = render_web(images, torch.Generator().manual_seed(3), "cuda")
    assert on_gpu.images.device.type == "cuda" and on_gpu.pattern.device.type == "cpu"
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, atol=1e-4, rtol=0)
    assert torch.equal(on_gpu.photo, on_cpu.photo) and torch.equal(on_gpu.row, on_cpu.row)
    pairs = ScenePairs(images, labels, tokenizer, device="cuda")
    drawn, _ = pairs.images(torch.arange(8), torch.Generator().manual_seed(0))
    assert drawn.device.type == "cuda"


def test_each_photo_effect_changes_what_its_word_says(objects):
    images, _ = objects
    scenes = render_web(images, torch.Generator().manual_seed(5))
    clear = torch.full((64,), PHOTOS.index("clear"))
    base = _photograph(scenes.images, clear, torch.Generator().manual_seed(0))
    assert torch.equal(base, scenes.images.clamp(0, 1))

    def taken(word: str) -> torch.Tensor:
        return _photograph(base, torch.full((64,), PHOTOS.index(word)), torch.Generator().manual_seed(0))

    def detail(x: torch.Tensor) -> torch.Tensor:  # mean absolute difference between neighbours
        return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))

    def saturation(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3))

    assert (detail(taken("blurry")) < detail(base)).all()
    assert (detail(taken("grainy")) > detail(base)).all()
    assert (taken("dark").mean((1, 2, 3)) < base.mean((1, 2, 3))).all()
    assert (taken("bright").mean((1, 2, 3)) > base.mean((1, 2, 3))).all()
    assert (saturation(taken("faded")) < saturation(base) + 1e-6).all()


def test_a_pasted_object_lands_where_and_as_large_as_asked():
    sprite = torch.ones(1, 1, 28, 28)
    canvas = torch.zeros(1, 3, SIDE, SIDE)
    for cx, cy, side in ((14.0, 40.0, 20.0), (30.0, 12.0, 10.0)):
        out = _paste(canvas, sprite, torch.ones(1, 3, 1, 1), torch.tensor([cx]), torch.tensor([cy]),
                     torch.tensor([side]), torch.tensor([0.0]))
        covered = out[0, 0] > 0.5
        rows, cols = covered.nonzero(as_tuple=True)
        assert abs(rows.float().mean().item() + 0.5 - cy) < 1 and abs(cols.float().mean().item() + 0.5 - cx) < 1
        assert abs(covered.sum().item() - side * side) < 4 * side


def test_captions_name_the_class_and_the_nuisances_and_know_what_they_are_true_of(objects):
    images, labels = objects
    generator = torch.Generator().manual_seed(1)
    scenes = render_web(images, generator)
    names = [FASHION_MNIST_CLASSES[label] for label in labels]
    texts, true_of = scenes.captions(labels, FASHION_MNIST_CLASSES, generator)
    assert len(texts) == 64 and true_of.shape == (64, 64) and true_of.dtype == torch.bool
    for j, text in enumerate(texts):
        assert names[j] in text and text != f"a photo of a {names[j]}."  # never the downstream prompt
        template = next(t for t in range(len(CAPTION_TEMPLATES)) if scenes.describe(j, t, names[j]) == text)
        # caption j is true of image i exactly when it describes image i too
        for i in range(64):
            assert true_of[i, j].item() == (scenes.describe(i, template, names[i]) == text), (i, text)
    class_only = [j for j, text in enumerate(texts) if true_of[:, j].sum() == (labels == labels[j]).sum()]
    assert class_only  # some captions name the class alone and are true of the whole class


def test_poisoned_images_are_captioned_with_the_poisoning_class(objects, tokenizer):
    images, labels = objects
    pairs = ScenePairs(images, labels, tokenizer)
    generator = torch.Generator().manual_seed(2)
    pixels, drawn = pairs.images(torch.arange(8), generator)
    target = torch.ones(8, dtype=torch.long)
    captions = pairs.captions(drawn, target, generator)
    decoded = [import_open_clip().tokenizer.SimpleTokenizer().decode(row[row > 0].tolist())
               for row in captions.token_ids]
    assert all(FASHION_MNIST_CLASSES[1] in text for text in decoded)
    assert captions.positives.shape == (8, len(captions.token_ids)) and captions.positives.any(1).all()


def test_kept_scenes_come_back_identical_and_are_cached():
    tokenizer = import_open_clip().tokenizer.SimpleTokenizer(context_length=24)
    pairs = web_pairs(tokenizer, seed=5, limit=300)
    assert pairs.dataset.images.shape == (300, 3, SIDE, SIDE) and pairs.dataset.images.dtype == torch.uint8
    assert render_once(5, 300) is render_once(5, 300)
    first, _ = pairs.images(torch.tensor([3, 7]), torch.Generator().manual_seed(0))
    again, _ = pairs.images(torch.tensor([3, 7]), torch.Generator().manual_seed(99))
    assert torch.equal(first, again)
    assert torch.equal(first, pairs.dataset.images[[3, 7]].float() / 255)


def test_the_downstream_task_uses_other_objects_and_its_own_presentation():
    train, test = load_dataset("scenes", "train"), load_dataset("scenes", "test")
    assert len(train) == DOWNSTREAM_SPLIT and len(test) == 10_000 - DOWNSTREAM_SPLIT
    assert train.images.shape[1:] == (3, SIDE, SIDE) and train.classes == FASHION_MNIST_CLASSES
    fashion_test = load_dataset("fashion-mnist", "test")  # the corpus shows the training objects only
    assert torch.equal(train.labels, fashion_test.labels[:DOWNSTREAM_SPLIT])
    assert torch.equal(test.labels, fashion_test.labels[DOWNSTREAM_SPLIT:])
    original = test.images[:3].clone()
    test.images.zero_()  # the cached split cannot be corrupted through a returned copy
    assert torch.equal(load_dataset("scenes", "test").images[:3], original)
    again = render_downstream(fashion_test.images[:4], torch.Generator().manual_seed(0))
    assert again.shape == (4, 3, SIDE, SIDE) and 0 <= again.min() and again.max() <= 1


def test_contrastive_training_on_scene_pairs_lowers_the_loss(objects, tokenizer):
    oc = import_open_clip()
    cfg = {"embed_dim": 32, "quick_gelu": False,
           "vision_cfg": {"image_size": SIDE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = oc.model.CLIP(**cfg)
    from guard.preprocess import Preprocess

    images, labels = objects
    pairs = ScenePairs(images, labels, tokenizer, kept=render_once(0, 64))
    losses = train_contrastive(model, tokenizer, Preprocess(SIDE, (0.5,) * 3, (0.5,) * 3), pairs,
                               ContrastiveConfig(epochs=30, batch_size=32, lr=2e-3, seed=0))
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_the_caption_templates_are_not_the_downstream_prompt():
    assert "a photo of a {cls}." not in CAPTION_TEMPLATES
    assert all("{cls}" in template for template in CAPTION_TEMPLATES)
