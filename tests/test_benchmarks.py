"""The benchmarks run end to end on the tiny model (timings are not asserted: they belong
in the benchmark reports, not in tests)."""
import pytest

from benchmarks import alerts, inference


@pytest.mark.usefixtures("one_torch_thread")
def test_the_alert_benchmark_measures_both_calls_on_the_served_model(tmp_path):
    rows = alerts.run(["tiny"], ["torch"], [2], seconds=0.01)
    [row] = rows
    assert (row["model"], row["backend"], row["batch"]) == ("tiny", "torch", 2)
    assert row["plain_ms"] > 0 and row["alerts_ms"] > 0 and row["perturbations_ms"] > 0
    assert row["alerts_over_plain"] == pytest.approx(row["alerts_ms"] / row["plain_ms"], rel=1e-2)
    assert row["perturbations"] == ["open:3", "median:3"]
    # torch-only opt-in alerts
    assert row["frozen_view_over_plain"] > 0 and row["density_over_plain"] > 0 and row["detector_over_plain"] > 0
    text = alerts.markdown(rows, inference.environment())
    assert "| tiny | torch | 2 |" in text and "density / without" in text and "detector / without" in text


@pytest.mark.usefixtures("one_torch_thread")
def test_the_inference_benchmark_times_every_form(tmp_path):
    results = inference.run(["tiny"], ["torch"], [2], seconds=0.01, memory=False)
    forms = {result.form for result in results}
    assert {"plain", "literal", "folded"} <= forms
    [row] = inference.ratios(results)
    assert row["folded_over_plain"] > 0 and row["speedup_over_torch_folded"] == 1.0
    assert "| tiny | torch | 2 |" in inference.markdown(results, [row], inference.environment())


def test_peak_memory_counts_the_forward_pass_only(tmp_path):
    artifacts = inference.write_artifacts("tiny", tmp_path)
    small = inference.peak_memory_mib("torch", "literal", artifacts, tmp_path, 1, 32)
    large = inference.peak_memory_mib("torch", "literal", artifacts, tmp_path, 512, 32)
    # batch 512 of the literal tower holds [512, 81, 128] activations per block: tens of MiB
    assert 0 <= small < large and large > 10
