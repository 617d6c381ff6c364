"""guard.alerts (the per-input trigger alert) and training.detection (its evaluation)."""
import json
import threading

import pytest
import torch
import torch.nn.functional as F

from guard.alerts import (PERTURBATIONS, STATISTICS, AlertConfig, alert_scores, alerts, calibrate_threshold,
                          expand_batch, median_filter, opening)
from guard.density import ClassDensity
from guard.errors import InputError
from guard.prompted import PromptedCLIP
from training import detection
from training.attacks import SIG, Backdoor, BadNet, Blended, WaNet, save_trigger
from training.evaluate import load_classifier

from conftest import CLASSES

ALL_PERTURBATIONS = ("median:3", "open:3", "close:3", "blur:5", "downup:2", "noise:0.1", "quant:4", "hflip",
                     "frozen")  # the frozen-tower view: an image copy, last


def _images(n=6, side=16, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


class PatchModel(torch.nn.Module):
    """A toy 'backdoored' model: one embedding direction answers to small bright spots
    (the image minus its 3x3 opening), the other to the mean intensity; logits follow."""

    def forward(self, images):
        spot = (images - opening(images, 3)).flatten(1).amax(1)
        embedding = torch.stack([images.flatten(1).mean(1) + 0.1, 4 * spot, torch.full_like(spot, 0.05)], 1)
        return embedding @ torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), embedding


def _score(model, images, config):
    logits, embedding = model(expand_batch(images, config))
    return alert_scores(logits, embedding, len(images), config)


@pytest.mark.parametrize("size", [3, 5])
def test_median_filter_matches_torch_median(size):
    images = torch.cat([_images(4, 12), torch.randint(0, 3, (2, 3, 12, 12)).float() / 2])  # with ties
    pad = size // 2
    windows = F.unfold(F.pad(images, (pad,) * 4, mode="reflect"), size).view(6, 3, size * size, -1)
    assert torch.equal(median_filter(images, size), windows.median(dim=2).values.view_as(images))


def test_expand_batch_layout():
    images = _images()
    config = AlertConfig(("open:3", "hflip"))
    expanded = expand_batch(images, config)
    assert expanded.shape == (18, 3, 16, 16)
    assert torch.equal(expanded[:6], images)
    assert torch.equal(expanded[6:12], opening(images, 3))
    assert torch.equal(expanded[12:], images.flip(-1))


@pytest.mark.parametrize("spec", ALL_PERTURBATIONS)
def test_every_perturbation_keeps_shape_range_and_batch_independence(spec):
    images = _images()
    out = expand_batch(images, AlertConfig((spec,)))[6:]
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    alone = expand_batch(images[2:3], AlertConfig((spec,)))[1:]
    assert torch.allclose(alone, out[2:3], atol=1e-6)  # an image's copy does not depend on its batch


@pytest.mark.parametrize("statistic", sorted(STATISTICS))
def test_scores_shape_and_zero_when_nothing_moves(statistic):
    config = AlertConfig(("median:3", "blur:3"), statistic)
    logits, embedding = torch.randn(5, 4), torch.randn(5, 8)
    scores = alert_scores(logits.repeat(3, 1), embedding.repeat(3, 1), 5, config)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.allclose(scores, torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("statistic", sorted(STATISTICS))
def test_moving_outputs_score_higher(statistic):
    # image 0: the copy's embedding turns orthogonal and its logits turn 60 degrees; image 1 stays.
    config = AlertConfig(("hflip",), statistic)
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 3 ** 0.5], [1.0, 1.0]])
    embedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    scores = alert_scores(logits, embedding, 2, config)
    assert scores[0] > scores[1] + 0.1


def test_direction_on_a_patch_trigger():
    """Through expand_batch: a bright 3x3 spot that the toy model reacts to is removed by the
    default perturbations, so triggered images score higher than smooth clean ones."""
    clean = 0.3 + 0.4 * F.avg_pool2d(_images(8, 16), 5, stride=1, padding=2)
    triggered = clean.clone()
    triggered[:, :, 5:8, 9:12] = 1.0
    clean_scores, triggered_scores = _score(PatchModel(), clean, AlertConfig()), _score(
        PatchModel(), triggered, AlertConfig())
    assert triggered_scores.min() > clean_scores.max()


def test_scores_are_deterministic_and_leave_the_global_rng_alone():
    config = AlertConfig(ALL_PERTURBATIONS)
    images = _images(4, 16)
    state = torch.random.get_rng_state()
    first = _score(PatchModel(), images, config)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(_score(PatchModel(), images, config), first)
    assert torch.allclose(_score(PatchModel(), images[1:2], config), first[1:2], atol=1e-6)


def test_thread_safe():
    config = AlertConfig(ALL_PERTURBATIONS)
    images = _images(8, 16, seed=1)
    expected = _score(PatchModel(), images, config)
    results, errors = [None] * 8, []

    def work(index):
        try:
            for _ in range(5):
                results[index] = _score(PatchModel(), images, config)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(torch.equal(result, expected) for result in results)


def test_empty_batches():
    config = AlertConfig()
    assert expand_batch(torch.zeros(0, 3, 8, 8), config).shape == (0, 3, 8, 8)
    assert alert_scores(torch.zeros(0, 4), torch.zeros(0, 0), 0, config).shape == (0,)


def test_scores_are_differentiable():
    images = _images(3, 16).requires_grad_(True)
    _score(PatchModel(), images, AlertConfig()).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_config_round_trip():
    for config in (AlertConfig(), AlertConfig(ALL_PERTURBATIONS, "kl", 0.25), AlertConfig(["hflip"], "pr", 1)):
        again = AlertConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config and isinstance(again.perturbations, tuple)
    assert AlertConfig().num_perturbations == 2
    # every image perturbation, and the frozen-tower option in its manifest spelling
    assert set(spec.partition(":")[0] for spec in ALL_PERTURBATIONS) == set(PERTURBATIONS) | {"frozen"}
    frozen = AlertConfig(ALL_PERTURBATIONS)
    assert frozen.frozen_tower and "frozen" not in frozen.perturbations and frozen.views == ALL_PERTURBATIONS


@pytest.mark.parametrize("kwargs", [
    {"perturbations": ()}, {"perturbations": "median:3"}, {"perturbations": ("sharpen:3",)},
    {"perturbations": ("median:2",)}, {"perturbations": ("median:x",)}, {"perturbations": ("median",)},
    {"perturbations": ("hflip:1",)}, {"perturbations": ("noise:0",)}, {"perturbations": ("noise:nan",)},
    {"perturbations": ("downup:1",)}, {"perturbations": (3,)}, {"statistic": "entropy"}, {"statistic": ["pr"]},
    {"threshold": "high"}, {"threshold": float("inf")}, {"threshold": True},
])
def test_bad_configs_raise_input_error(kwargs):
    with pytest.raises(InputError):
        AlertConfig(**kwargs)


@pytest.mark.parametrize("data", [[], {"perturbations": ["hflip"]}, {"perturbations": ["hflip"], "statistic": "pr",
                                                                     "extra": 1}])
def test_bad_dicts_raise_input_error(data):
    with pytest.raises(InputError):
        AlertConfig.from_dict(data)


def test_bad_inputs_raise_input_error():
    config = AlertConfig()
    with pytest.raises(InputError):
        expand_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), config)
    with pytest.raises(InputError):
        expand_batch(torch.zeros(2, 1, 8, 8), config)
    with pytest.raises(InputError):
        expand_batch(torch.zeros(2, 3, 4, 4), AlertConfig(("median:5",)))
    with pytest.raises(InputError):
        alert_scores(torch.zeros(5, 3), torch.zeros(6, 4), 2, config)
    with pytest.raises(InputError):
        alert_scores(torch.zeros(6, 3), torch.zeros(6, 4), -2, config)
    with pytest.raises(InputError):
        calibrate_threshold(torch.zeros(4), fpr=1.5)
    with pytest.raises(InputError):
        alerts(torch.zeros(3), config)


def test_threshold_and_alerts():
    clean = torch.linspace(0, 1, 1001)
    threshold = calibrate_threshold(clean, 0.01)
    assert (clean > threshold).double().mean().item() == pytest.approx(0.01, abs=0.002)
    config = AlertConfig(threshold=threshold)
    assert alerts(torch.tensor([0.0, 2.0]), config).tolist() == [False, True]


# --- training.detection --------------------------------------------------------------

def test_auroc_and_rates():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    clean, triggered = torch.randn(300, generator=generator), torch.randn(200, generator=generator) + 1
    triggered[:20] = clean[:20]  # ties
    expected = sklearn_metrics.roc_auc_score([0] * 300 + [1] * 200, torch.cat([clean, triggered]).numpy())
    assert detection.auroc(clean, triggered) == pytest.approx(expected, abs=1e-9)
    assert detection.auroc(torch.zeros(5), torch.ones(5)) == 1.0
    assert detection.auroc(torch.ones(5), torch.ones(5)) == 0.5
    metrics = detection.detection_metrics(torch.arange(100.0), torch.tensor([50.0, 99.5, 200.0]))
    assert metrics["tpr@1"] == pytest.approx(2 / 3) and metrics["tpr@5"] == pytest.approx(2 / 3)
    assert detection.parse_alert("pr=open:3+hflip") == AlertConfig(("open:3", "hflip"), "pr")
    with pytest.raises(InputError):
        detection.parse_alert("pr_terms")


def test_evaluate_detection_mechanics(tiny_artifact, tmp_path):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % len(CLASSES)
    backdoor = Backdoor(BadNet(32, seed=0), 0, CLASSES[0])
    candidates = (detection.DEFAULT, AlertConfig(("hflip",), "pr"))
    result = detection.evaluate_detection(model, preprocess, images, labels, backdoor, candidates,
                                          overlays=images[:3], strip_counts=(2,), attack_images=images[:8],
                                          adaptive_weights=(1.0,), adaptive_steps=2, calibration=(images, labels),
                                          density_adaptive_weights=(0.5,))
    assert result["n_clean"] == 24 and result["n_triggered"] == 18
    assert set(result["candidates"]) == {"pr_terms[open3,median3]", "pr[hflip]"}
    default = result["candidates"]["pr_terms[open3,median3]"]
    assert default["default"] and default["passes"] == 3 and 0.0 <= default["auroc"] <= 1.0
    assert result["strip"]["strip-2"]["passes"] == 3
    adaptive, *against_density = result["adaptive"]
    assert adaptive["alert"] == "pr_terms[open3,median3]" and 0.0 <= adaptive["evade@1"] <= 1.0
    assert [(entry["alert"], entry["weight"], entry["passes"]) for entry in against_density] == [
        ("feature density, served tower", 0.5, 1), ("feature density, frozen tower", 0.5, 2)]
    assert all(0.0 <= entry["evade@1"] <= 1.0 for entry in against_density)
    assert set(result["frozen_tower"]) == {"disagreement", "pr_terms[open3,median3]+frozen tower"}
    assert result["frozen_tower"]["disagreement"]["passes"] == 2
    assert result["frozen_tower"]["pr_terms[open3,median3]+frozen tower"]["passes"] == 4
    assert {name: entry["passes"] for name, entry in result["density"].items()} == {
        "feature density, served tower": 1, "feature density, frozen tower": 2}
    table = detection.format_table(result)
    assert "(default)" in table and "strip-2" in table and "adaptive vs" in table and "frozen tower" in table
    assert "feature density, served tower" in table
    json.dumps(result)
    assert detection.plot_scores(result, tmp_path / "scores.png").stat().st_size > 0


def test_frozen_tower_signal_is_the_default_statistic_with_the_frozen_tower_as_one_more_view(tiny_artifact):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % len(CLASSES)
    backdoor = Backdoor(BadNet(32, seed=0), 0, CLASSES[0])
    result = detection.evaluate_detection(model, preprocess, images, labels, backdoor, (detection.DEFAULT,),
                                          strip_counts=())
    # by hand, on the clean images: the prompted model on x, open(x), median(x), and the tower with no prompts on x
    frozen = PromptedCLIP(model.encoder, model.text_features, model.logit_scale)
    resized = preprocess.resize(images)
    with torch.no_grad():
        logits, embedding = model(preprocess.normalize(expand_batch(resized, detection.DEFAULT)))
        tower_logits, tower_embedding = frozen(preprocess.normalize(resized))
    n = len(images)
    views_h = [embedding[n:2 * n], embedding[2 * n:], tower_embedding]
    views_z = [logits[n:2 * n], logits[2 * n:], tower_logits]
    ch = torch.stack([F.cosine_similarity(embedding[:n], h, dim=-1) for h in views_h])
    cz = torch.stack([F.cosine_similarity(logits[:n], z, dim=-1) for z in views_z])
    clean_combined, _ = result["scores"]["pr_terms[open3,median3]+frozen tower"]
    assert torch.allclose(torch.tensor(clean_combined), (1 - ch.mean(0)) + (1 - cz.mean(0)), atol=1e-5)
    clean_disagreement, _ = result["scores"]["disagreement"]
    assert torch.allclose(torch.tensor(clean_disagreement), (1 - ch[2]) + (1 - cz[2]), atol=1e-5)
    assert min(clean_disagreement) > 1e-4  # the prompts do move this model
    # no prompts, nothing to disagree with: the section stays empty
    unprompted = detection.evaluate_detection(frozen, preprocess, images, labels, backdoor, (detection.DEFAULT,),
                                              strip_counts=())
    assert unprompted["frozen_tower"] == {}


def test_feature_density_is_fitted_on_the_calibration_tokens_of_each_tower(tiny_artifact):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    calibration = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels, calibration_labels = torch.arange(12) % len(CLASSES), torch.arange(30) % len(CLASSES)
    backdoor = Backdoor(BadNet(32, seed=0), 0, CLASSES[0])
    result = detection.evaluate_detection(model, preprocess, images, labels, backdoor, (), strip_counts=(),
                                          calibration=(calibration, calibration_labels))
    encoder = model.encoder
    with torch.no_grad():
        for tower, prompts in (("served", model.prompts), ("frozen", None)):
            tokens = encoder.final_class_token(preprocess.normalize(preprocess.resize(calibration)), prompts)
            density = ClassDensity.fit(tokens, calibration_labels, len(CLASSES))
            expected = density.score(encoder.final_class_token(preprocess.normalize(preprocess.resize(images)),
                                                               prompts))
            clean_scores, _ = result["scores"][f"feature density, {tower} tower"]
            torch.testing.assert_close(torch.tensor(clean_scores), expected)
    served, _ = result["scores"]["feature density, served tower"]
    frozen_scores, _ = result["scores"]["feature density, frozen tower"]
    assert not torch.allclose(torch.tensor(served), torch.tensor(frozen_scores))  # the prompts move the tokens
    unprompted = PromptedCLIP(model.encoder, model.text_features, model.logit_scale)
    result = detection.evaluate_detection(unprompted, preprocess, images, labels, backdoor, (), strip_counts=(),
                                          calibration=(calibration, calibration_labels))
    assert list(result["density"]) == ["feature density, served tower"]


def test_runtime_frozen_tower_view_gives_the_detection_score(tiny_artifact):
    import guard

    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    resized = preprocess.resize(images)
    default, _ = detection.alert_scores_of(model, preprocess, resized, detection.DEFAULT)
    tower, _ = detection.alert_scores_of(model, preprocess, resized, AlertConfig(("frozen",)))
    config = AlertConfig(("open:3", "median:3", "frozen"))
    assert config.uses_frozen_tower and not detection.DEFAULT.uses_frozen_tower
    with guard.load(tiny_artifact.path, device="cpu") as served:  # folded, one backend call per batch
        scores = served.alert_scores(list(images), batch_size=4, config=config)
    torch.testing.assert_close(scores, (2 * default + tower) / 3, atol=1e-5, rtol=1e-4)


def test_the_frozen_tower_view_comes_last_and_takes_no_parameter():
    with pytest.raises(InputError, match="must be the last perturbation"):
        AlertConfig(("frozen", "open:3"))
    with pytest.raises(InputError, match="takes no parameter"):
        AlertConfig(("open:3", "frozen:1"))


def _adaptive_objective(model, preprocess, trigger, images, target, weight):
    config = detection.DEFAULT
    with torch.no_grad():
        logits, embedding = model(preprocess.normalize(expand_batch(trigger(images), config)))
        return (F.cross_entropy(logits[:len(images)], torch.full((len(images),), target))
                + weight * alert_scores(logits, embedding, len(images), config).mean()).item()


@pytest.mark.parametrize("trigger", [BadNet(32, seed=0), BadNet(32, seed=0, position="per-image"),
                                     Blended(32, seed=0), WaNet(32, seed=0)], ids=lambda t: t.name)
def test_adaptive_attacker_reoptimises_any_trigger_within_its_bounds(tiny_artifact, trigger):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    backdoor = Backdoor(trigger, 1, CLASSES[1])
    objective = detection.alert_objective(model, preprocess, detection.DEFAULT)
    adapted = detection.adaptive_trigger(backdoor, images, objective, weight=1.0, steps=15, batch_size=16)
    assert type(adapted) is type(trigger) and adapted.params() == trigger.params()
    (name, before), = trigger.tensors().items()
    after = adapted.tensors()[name]
    assert after.shape == before.shape and not torch.equal(after, before)
    if name == "pattern":
        assert after.min() >= 0.0 and after.max() <= 1.0
    else:  # a warp field: no larger offset than the original's
        assert after.abs().max() <= before.abs().max() + 1e-6
    # the attacker's objective on its own images went down
    assert _adaptive_objective(model, preprocess, adapted, images, 1, 1.0) \
        < _adaptive_objective(model, preprocess, trigger, images, 1, 1.0)


def test_adaptive_attacker_against_the_feature_density_lowers_its_objective(tiny_artifact):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    generator = torch.Generator().manual_seed(4)
    calibration, images = torch.rand(30, 3, 32, 32, generator=generator), torch.rand(16, 3, 32, 32, generator=generator)
    tokens = detection.class_tokens_of(model, preprocess, calibration)
    density = ClassDensity.fit(tokens, torch.arange(30) % len(CLASSES), len(CLASSES))
    objective = detection.density_objective(model, preprocess, density, frozen=False, threshold=2.0)
    with torch.no_grad():
        logits, scores = objective(images)
    torch.testing.assert_close(scores, density.score(detection.class_tokens_of(model, preprocess, images)) / 2.0)
    torch.testing.assert_close(logits, model(preprocess.normalize(images))[0])
    backdoor = Backdoor(BadNet(32, seed=0), 1, CLASSES[1])
    adapted = detection.adaptive_trigger(backdoor, images, objective, weight=1.0, steps=15, batch_size=16)
    target = torch.full((16,), 1)

    def attacker_loss(trigger):
        with torch.no_grad():
            logits, scores = objective(trigger(images))
        return (F.cross_entropy(logits, target) + scores.mean()).item()
    assert attacker_loss(adapted) < attacker_loss(backdoor.trigger)


def test_the_alert_objective_runs_the_frozen_view_through_the_frozen_tower(tiny_artifact):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    config = detection.FROZEN_TOWER_SIGNALS["disagreement"]
    with torch.no_grad():
        logits, scores = detection.alert_objective(model, preprocess, config)(images)
    expected, expected_logits = detection.alert_scores_of(model, preprocess, images, config)  # as served
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(logits, expected_logits)
    assert scores.min() > 1e-4  # the frozen tower does disagree with the prompted one


def test_adaptive_attacker_needs_a_trigger_with_tensors(tiny_artifact):
    model, preprocess = load_classifier(str(tiny_artifact.path), CLASSES)
    with pytest.raises(InputError, match="has none"):
        detection.adaptive_trigger(Backdoor(SIG(32), 0, CLASSES[0]), torch.rand(4, 3, 32, 32),
                                   detection.alert_objective(model, preprocess, detection.DEFAULT), weight=1.0, steps=1)


def test_cli_on_an_image_folder(tiny_artifact, tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    for name in CLASSES:
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(6):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{index}.png")
    attack = tmp_path / "attack"
    attack.mkdir()
    save_trigger(BadNet(32, seed=0), attack, 0, CLASSES[0])
    out = tmp_path / "out.json"
    code = detection.main(["--model", str(tiny_artifact.path), "--attack", str(attack), "--data",
                           str(tmp_path / "data"), "--images", "8", "--candidates", "default", "--strip", "1",
                           "--adaptive-weights", "1", "--adaptive-steps", "1", "--json", str(out)])
    assert code == 0
    # the folder's test split holds 20 % of each class's 6 images: 4 in all, fewer than --images
    assert json.loads(out.read_text())["candidates"]["pr_terms[open3,median3]"]["n_clean"] == 4
    from guard import console

    # no trigger.json there: an artifact error, exit 3 in guard.console's table
    assert console.run(detection.main, ["--model", str(tiny_artifact.path), "--attack", str(tmp_path), "--data",
                                        str(tmp_path / "data"), "--no-progress"]) == console.EXIT_MODEL
    with pytest.raises(SystemExit) as exit_info:
        detection.main(["--model", str(tiny_artifact.path), "--attack", str(attack), "--strip", "two"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_default_alert_separates_badnet_on_real_data(zoo):
    from training.attacks import load_trigger
    from training.data import load_dataset

    test = load_dataset("fashion-mnist", "test")
    model, preprocess = load_classifier(str(zoo["badnet"]), test.classes)
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:200]
    train = load_dataset("fashion-mnist", "train")
    calibration = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:1000]
    result = detection.evaluate_detection(model, preprocess, test.images[chosen], test.labels[chosen],
                                          load_trigger(zoo["badnet"]), (detection.DEFAULT,),
                                          calibration=(train.images[calibration], train.labels[calibration]))
    default = result["candidates"]["pr_terms[open3,median3]"]
    assert default["auroc"] > 0.97 and default["tpr@5"] > 0.85
    density = result["density"]["feature density, served tower"]
    assert density["auroc"] > 0.97 and density["tpr@5"] > 0.85
