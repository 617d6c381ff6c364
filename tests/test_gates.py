"""training.gates: what the reference benchmark asks of a clean CLIP, and how each figure
is measured."""
from __future__ import annotations

import pytest
import torch

from training.models import LoadedCLIP, ModelIdentity
from training.text import DEFAULT_TEMPLATES, TextEncoder, class_text_features
from training.data import ImageDataset
from training.evaluate import model_outputs, zero_shot_classifier
from training.gates import GateFigures, context_cosine, format_gates, learned_context_cosine, measure_gates

from conftest import CLASSES

PASSING = dict(pr={"noise_0.03": 0.99, "blur_5": 0.90, "color_jitter": 0.85}, context_cosine=0.6,
               zero_shot_ca=85.0, floors={"badnet": 0.4, "sig": 1.0})


def test_passing_figures_have_no_failures():
    assert GateFigures(**PASSING).failures() == []
    assert GateFigures(**PASSING).to_dict()["failures"] == []


@pytest.mark.parametrize("change, words", [
    ({"pr": {"noise_0.03": 0.5, "blur_5": 0.96, "color_jitter": 0.8}}, "blur_5 is 0.960"),
    ({"pr": {"noise_0.03": 1.0, "blur_5": 0.9, "color_jitter": 0.951}}, "color_jitter is 0.951"),
    ({"context_cosine": 0.99}, "ignores its context"),
    ({"zero_shot_ca": 79.9}, "79.90 % < 80.0 %"),
    ({"floors": {"badnet": 0.2, "wanet": 1.5}}, "floor of wanet is 1.50 %"),
])
def test_each_gate_fails_alone_and_says_which(change, words):
    failures = GateFigures(**{**PASSING, **change}).failures()
    assert len(failures) == 1 and words in failures[0]


def test_figures_read_back_and_print_beside_their_bounds():
    figures = GateFigures(**{**PASSING, "random_contexts": {"vectors": 0.99}})
    assert GateFigures.from_dict(figures.to_dict()) == figures
    text = format_gates(figures)
    assert "PR blur_5" in text and "0.900  <= 0.95" in text and "noise_0.03" in text and "reported" in text
    assert "floor sig %" in text and text.endswith("gates: all hold")
    failing = format_gates(GateFigures(**{**PASSING, "zero_shot_ca": 79.9}))
    assert failing.splitlines()[-1] == "gates FAIL: zero-shot clean accuracy 79.90 % < 80.0 %"


@pytest.fixture()
def loaded(tiny_artifact, tokenizer):
    return LoadedCLIP(tiny_artifact.clip, tokenizer, tiny_artifact.preprocess,
                      ModelIdentity("test", "test", None, False, {}))


def test_context_cosine_is_seeded_and_compares_random_contexts_with_the_template(loaded):
    first, again = context_cosine(loaded, CLASSES, draws=3, seed=1), context_cosine(loaded, CLASSES, draws=3, seed=1)
    assert first == again and -1 <= first <= 1
    assert context_cosine(loaded, CLASSES, draws=3, seed=2) != first
    # a context that is the template's own words gives the template's embeddings: cosine 1
    text_encoder = TextEncoder(loaded.model)
    from training.text import ClassContext
    context = ClassContext(text_encoder, loaded.tokenizer, CLASSES, 4, init_words="a photo of a")
    with torch.no_grad():
        embeddings, ids = context()
        own = torch.nn.functional.normalize(text_encoder.encode(embeddings, ids).float(), dim=-1)
    template = class_text_features(text_encoder, loaded.tokenizer, CLASSES, DEFAULT_TEMPLATES)
    assert (own * template).sum(-1).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert first < 0.9999


def test_word_contexts_draw_from_the_vocabulary(loaded):
    vectors = context_cosine(loaded, CLASSES, draws=2, seed=1)
    words = context_cosine(loaded, CLASSES, draws=2, seed=1, vocabulary=("red", "striped", "photo"))
    assert words == context_cosine(loaded, CLASSES, draws=2, seed=1, vocabulary=("red", "striped", "photo"))
    assert words != vectors and -1 <= words <= 1
    # a one-word vocabulary repeated: every draw is the same context
    one = [context_cosine(loaded, CLASSES, draws=1, seed=s, vocabulary=("red",)) for s in (1, 2)]
    assert one[0] == pytest.approx(one[1], abs=1e-6)


def _synthetic(n: int, seed: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageDataset("synthetic", images, torch.arange(n) % len(CLASSES), CLASSES)


def test_a_learned_context_is_seeded_and_leaves_the_start(loaded, monkeypatch):
    shots = _synthetic(4 * len(CLASSES), 3)
    learned = learned_context_cosine(loaded, shots, seed=0)
    assert learned == learned_context_cosine(loaded, shots, seed=0) and -1 <= learned <= 1
    monkeypatch.setattr("training.gates.CONTEXT_STEPS", 0)
    assert learned_context_cosine(loaded, shots, seed=0) != pytest.approx(learned, abs=1e-4)


def test_measure_gates_reads_the_zero_shot_accuracy_and_keeps_the_floors(loaded):
    test = _synthetic(40, 0)
    images = test.images
    figures = measure_gates(loaded, test, _synthetic(40, 1), floors={"badnet": 2.5}, pr_images=20,
                            vocabulary=("red", "blue"), shots=2)
    assert set(figures.random_contexts) == {"vectors", "words"}
    logits, _ = model_outputs(zero_shot_classifier(loaded, CLASSES), loaded.preprocess, images)
    assert figures.zero_shot_ca == pytest.approx(100.0 * (logits.argmax(1) == test.labels).float().mean().item())
    assert set(figures.pr) == {"noise_0.03", "blur_5", "color_jitter"} and figures.floors == {"badnet": 2.5}
    assert any("floor of badnet" in failure for failure in figures.failures())
