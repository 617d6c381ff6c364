"""End to end on the reference benchmark: zoo -> purify -> artifact -> guard.load / evaluate.

Trains the real reference models (about 3 minutes on 2 cores), so it is marked slow;
CI runs it. The `zoo` fixture is in conftest.py (set CLIP_GUARD_TEST_ZOO to reuse a built zoo).
"""
import json

import pytest
import torch

import guard
from training import evaluate as evaluate_cli
from training import purify as purify_cli
from training.attacks import load_trigger
from training.data import load_dataset
from training.evaluate import model_outputs
from training.zoo import ZOO_JSON, build_zoo

pytestmark = pytest.mark.slow
PR_NAMES = {"noise_0.01", "noise_0.03", "blur_3", "blur_5", "color_jitter", "hflip", "badnet", "blended"}


@pytest.fixture(scope="session")
def purified(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("purified") / "rvpt"
    metrics = out.parent / "metrics.json"
    code = purify_cli.main(["--model", str(zoo["badnet"]), "--data", "fashion-mnist", "--shots", "16",
                            "--out", str(out), "--json", str(metrics), "--set", "pr_images=1000", "--no-progress"])
    assert code == 0
    return out, json.loads(metrics.read_text())


def _record(directory):
    return json.loads((directory / ZOO_JSON).read_text())


def test_reference_models_meet_their_targets(zoo):
    clean, backdoored = _record(zoo["clean"])["metrics"], _record(zoo["badnet"])["metrics"]
    assert clean["ca"] >= 80.0
    assert backdoored["asr"] >= 95.0
    assert abs(backdoored["ca"] - clean["ca"]) <= 3.0
    assert backdoored["target_name"] == "t-shirt"
    assert _record(zoo["clean"])["downstream"] == _record(zoo["badnet"])["downstream"] == "fashion-mnist"


def test_the_zoo_prints_its_gates_and_the_first_benchmark_fails_the_pr_gate(zoo, capsys):
    from training import zoo as zoo_cli

    out = zoo["clean"].parent
    assert zoo_cli.main(["--out", str(out), "--attacks", "badnet", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    gates = json.loads((out / "gates.json").read_text())
    assert set(gates["floors"]) == {"badnet"} and 0.0 <= gates["floors"]["badnet"] < 100.0
    assert gates["zero_shot_ca"] == pytest.approx(_record(zoo["clean"])["metrics"]["ca"])
    # this clean CLIP encodes almost nothing class-irrelevant: why the scenes benchmark exists
    assert gates["pr"]["blur_5"] > 0.95 and any("blur_5" in failure for failure in gates["failures"])
    assert "floor badnet %" in printed and "gates FAIL" in printed


def test_zoo_is_cached(zoo):
    stamps = {name: (path / "open_clip_model.safetensors").stat().st_mtime_ns for name, path in zoo.items()}
    rebuilt = build_zoo(zoo["clean"].parent)
    assert {name: (path / "open_clip_model.safetensors").stat().st_mtime_ns for name, path in rebuilt.items()} == stamps


def test_purified_artifact_serves_what_training_measured(zoo, purified):
    out, metrics = purified
    test = load_dataset("fashion-mnist", "test")
    backdoor = load_trigger(zoo["badnet"])
    with guard.load(out) as served:
        assert served.classes == test.classes
        images = served.preprocess.resize(test.images[:64])
        served_logits = served.logits(list(images))
        triggered = [result.index for result in served.classify(list(backdoor.trigger(images)))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["after"]["ca"] == pytest.approx(metrics["after"]["ca"])
    assert manifest["base_model"]["sha256"] and manifest["method"]["name"] == "rvpt"
    assert -1.0 <= manifest["metrics"]["fr_cosine"] == metrics["fr_cosine"] < 1.0  # reported in both
    # the runtime's own preprocessing path agrees with the evaluation path
    from guard.artifact import load_artifact
    from guard.runtime import build_classifier
    reference, _ = model_outputs(build_classifier(load_artifact(out)), served.preprocess, test.images[:64])
    torch.testing.assert_close(served_logits, reference, atol=1e-4, rtol=1e-4)
    reference_triggered, _ = model_outputs(build_classifier(load_artifact(out)), served.preprocess,
                                           test.images[:64], backdoor.trigger)
    assert triggered == reference_triggered.argmax(1).tolist()


def test_purification_summary_reports_before_and_after(purified):
    _, metrics = purified
    for stage in ("before", "after"):
        assert set(metrics[stage]["pr"]) == PR_NAMES
        assert 0 <= metrics[stage]["asr"] <= metrics[stage]["asr_all"] + 10
    assert metrics["before"]["asr"] >= 95.0


def test_evaluate_cli_writes_the_documented_json(zoo, purified, tmp_path):
    out, metrics = purified
    result_path = tmp_path / "eval.json"
    code = evaluate_cli.main(["--model", str(out), "--data", "fashion-mnist", "--attack", str(zoo["badnet"]),
                              "--json", str(result_path), "--pr-images", "1000", "--no-progress"])
    assert code == 0
    result = json.loads(result_path.read_text())
    assert {"ca", "asr", "asr_all", "pr"} <= set(result)
    assert set(result["pr"]) == PR_NAMES
    # Fashion-MNIST's test set has 1,000 images per class: CA is the mean of the per-class figures
    assert len(result["ca_per_class"]) == 10 and "t-shirt" in result["ca_per_class"]
    assert sum(result["ca_per_class"].values()) / 10 == pytest.approx(result["ca"], abs=1e-4)
    # evaluating the saved artifact reproduces what purify measured in memory
    assert result["ca"] == pytest.approx(metrics["after"]["ca"], abs=1e-6)
    assert result["asr"] == pytest.approx(metrics["after"]["asr"], abs=1e-6)
    for name in PR_NAMES:
        assert result["pr"][name] == pytest.approx(metrics["after"]["pr"][name], rel=1e-4)
    # asr_untriggered: the same count as asr on the clean images, by hand
    from guard.artifact import load_artifact
    from guard.runtime import build_classifier
    test, artifact = load_dataset("fashion-mnist", "test"), load_artifact(out)
    predictions = model_outputs(build_classifier(artifact), artifact.preprocess, test.images)[0].argmax(1)
    others = test.labels != result["target"]
    expected = 100.0 * (predictions[others] == result["target"]).double().mean().item()
    assert result["asr_untriggered"] == pytest.approx(expected, abs=1e-4)
    assert 0 < result["asr_untriggered"] < result["asr"]  # the paper-setting RVPT leaves the backdoor in
    assert result["floor"] is None and result["excess_asr"] is None  # no reference given


def test_evaluate_reports_the_floor_and_the_excess_over_a_never_poisoned_reference(zoo, tmp_path):
    result_path = tmp_path / "eval.json"
    code = evaluate_cli.main(["--model", str(zoo["badnet"]), "--data", "fashion-mnist", "--attack", str(zoo["badnet"]),
                              "--reference", str(zoo["clean"]), "--json", str(result_path), "--pr-images", "0",
                              "--no-progress"])
    assert code == 0
    result = json.loads(result_path.read_text())
    # the floor is the clean model's own ASR with the same trigger on the same images
    clean_path = tmp_path / "clean.json"
    assert evaluate_cli.main(["--model", str(zoo["clean"]), "--data", "fashion-mnist", "--attack", str(zoo["badnet"]),
                              "--json", str(clean_path), "--pr-images", "0", "--no-progress"]) == 0
    assert result["floor"] == pytest.approx(json.loads(clean_path.read_text())["asr"], abs=1e-9)
    assert result["excess_asr"] == pytest.approx(result["asr"] - result["floor"], abs=1e-9)
    assert result["excess_asr"] > 80  # the zoo's backdoor is far above its floor
    assert evaluate_cli.main(["--model", str(zoo["clean"]), "--data", "fashion-mnist", "--reference",
                              str(zoo["clean"]), "--pr-images", "0", "--no-progress"]) == 2  # no trigger: no floor


def test_command_line_errors_exit_2_and_an_unusable_model_3(tmp_path, capsys):
    assert purify_cli.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 3
    assert "error:" in capsys.readouterr().err
    assert purify_cli.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                            "--set", "alpha=high"]) == 2
    assert "must be float" in capsys.readouterr().err
    assert evaluate_cli.main(["--model", str(tmp_path / "missing"), "--data", "digits"]) == 3


def test_compiled_backends_agree_with_torch_on_the_reference_test_set(purified, tmp_path):
    from export.onnx import export_onnx
    from export.parity import compare_on_images, failures

    out, _ = purified
    compiled = []
    for precision in ("fp32", "fp16", "int8"):
        export_onnx(out, tmp_path / f"{precision}.onnx", precision=precision)
        compiled.append(tmp_path / f"{precision}.onnx")
    # AOTInductor's parity is tested on the tiny model (tests/test_export.py): its compile is the slow part.
    test = load_dataset("fashion-mnist", "test")
    results = compare_on_images(out, compiled, test.images)
    assert failures(results) == []
    assert {precision for precision, _ in results.values()} == {"fp32", "fp16", "int8"}
    assert all(result.images == len(test.images) for _, result in results.values())


def test_trigger_inversion_finds_the_real_target_and_unlearning_removes_most_of_the_backdoor(zoo, tmp_path):
    """RVPT's extension (training.inversion): on the real BadNet model the inversion, from the
    160 clean shots alone, singles out the target; prompts that unlearn its trigger cut the
    ASR (the full-length figures are in docs/reference-benchmark.md)."""
    metrics = tmp_path / "metrics.json"
    code = purify_cli.main(["--preset", "unlearn", "--model", str(zoo["badnet"]), "--data", "fashion-mnist",
                            "--out", str(tmp_path / "unlearned"), "--json", str(metrics), "--set", "unlearn_steps=100",
                            "--set", "epochs=20", "--set", "test_limit=1000", "--set", "pr_images=0",
                            "--no-progress"])
    assert code == 0
    result = json.loads(metrics.read_text())
    inversion = result["inversion"]
    assert inversion["suspected_target"] == "t-shirt" and inversion["backdoor_likely"]
    assert result["before"]["asr"] > 95.0 and result["after"]["asr"] < 20.0
    assert result["after"]["ca"] > result["before"]["ca"] - 5.0
    manifest = json.loads((tmp_path / "unlearned" / "manifest.json").read_text())
    assert manifest["metrics"]["inversion"] == inversion
