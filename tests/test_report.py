"""training.report on a two-model zoo (a tiny random CLIP and a BadNet-poisoned copy, on
sklearn's digits): the runs it plans, the tables it writes agree with the runs' own
records, it resumes instead of retraining, parallel runs give the same figures, and bad
requests are typed errors."""
import copy
import json

import pytest
import torch

from conftest import TINY_CFG
from guard._compat import import_open_clip
from guard.errors import InputError
from training.models import save_clip
from guard.preprocess import Preprocess
from training import report as report_cli
from training.attacks import BadNet
from training.contrastive import ContrastiveConfig
from training.poison import poison
from training.report import (CLEAN, DETECTION_JSON, RESULT_JSON, STRIP_OVERLAYS, ReportPlan, ReportSettings,
                             build_report, make_run, parse_settings, purify_arguments)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ("--set", "rvpt.epochs=1", "--set", "rvpt.num_tokens=2", "--set", "cbpt.epochs=1",
        "--set", "cbpt.warmup_epochs=0", "--set", "cbpt.inversion_steps=1")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """ZOO/clean (a tiny random CLIP) and ZOO/badnet (it, poisoned for a few steps)."""
    torch.manual_seed(0)
    clip = import_open_clip().model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    root = tmp_path_factory.mktemp("zoo")
    clean = save_clip(clip, TINY_CFG, Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), root / CLEAN)
    poison(str(clean), "digits", BadNet(32), 0, root / "badnet", rate=0.1,
           config=ContrastiveConfig(epochs=0.2, batch_size=64), run_evaluation=False)
    return root


def _settings(zoo, out, **overrides):
    arguments = dict(data="digits", shots=2, test_limit=60, pr_images=20,
                     stage_settings=parse_settings([item for item in FAST if item != "--set"]))
    arguments.update(overrides)
    return ReportSettings(zoo, out, **arguments)


def test_sweep_points_at_the_reports_own_setting_are_the_main_runs(tmp_path):
    settings = _settings(tmp_path, tmp_path / "out")
    plan = ReportPlan(attacks=("badnet",), clean=CLEAN, defenses=("rvpt", "cbpt"), sweep_attacks=("badnet",),
                      sweep_shots=(1, 2), sweep_alphas=(0.0, 2.0), ablation_attacks=("badnet",))
    names = [(run.model, run.name) for run in plan.runs(settings)]
    assert names == [
        (CLEAN, "none"), ("badnet", "none"), ("badnet", "rvpt"), ("badnet", "cbpt"),
        ("badnet", "rvpt-shots=1"), ("badnet", "rvpt-alpha=0.0"),  # shots 2 and alpha 2 are "rvpt" itself
        ("badnet", "cbpt-positive=closest"), ("badnet", "cbpt-positive=random"),
        *(("badnet", f"cbpt-num_context={length}") for length in (1, 2, 8, 16))]  # 4 is the default
    assert len(set(names)) == len(names)
    # a --set value moves the default point with it
    moved = _settings(tmp_path, tmp_path / "out", stage_settings=parse_settings(["rvpt.alpha=4"]))
    assert make_run("badnet", "rvpt", moved, alpha=4.0).name == "rvpt"
    assert make_run("badnet", "rvpt", moved, alpha=2.0).name == "rvpt-alpha=2.0"
    # ... and never reaches VPT, whose alpha is 0 by definition
    assert "alpha" not in purify_arguments(make_run("badnet", "vpt", moved), moved)["settings"]
    assert purify_arguments(make_run("badnet", "rvpt", moved, shots=1), moved) == {
        "method": "rvpt", "shots": 1, "seed": 0, "pr_images": 20, "test_limit": 60, "settings": {"alpha": 4}}
    # a stage's settings reach rvpt+cbpt's stage of that name
    assert purify_arguments(make_run("badnet", "rvpt+cbpt", moved), moved)["settings"] == {"rvpt.alpha": 4}


def test_report_tables_agree_with_the_runs_and_a_rerun_reuses_them(zoo, tmp_path):
    out = tmp_path / "report"
    arguments = ["--zoo", str(zoo), "--out", str(out), "--data", "digits", "--shots", "2", "--test-limit", "60",
                 "--pr-images", "20", "--defenses", "none,linear-probe,rvpt,cbpt", "--sweep-shots", "1,2",
                 "--sweep-alphas", "0,2", "--cbpt-contexts", "1,4,8", "--detection-images", "30",
                 "--adaptive-steps", "2", "--no-progress",
                 "--set", "probe.epochs=2", *FAST]
    assert report_cli.main(arguments) == 0
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["attacks"] == ["badnet"] and summary["rows"] == ["none", "linear-probe", "rvpt", "cbpt"]
    for row in summary["rows"]:
        recorded = json.loads((out / "runs" / "badnet" / row / RESULT_JSON).read_text())["after"]
        cell = summary["table"][row]["badnet"]
        assert (cell["asr"], cell["ca"], cell["pr"]) == (recorded["asr"], recorded["ca"], recorded["pr"])
        assert recorded["num_images"] == 60 and recorded["num_pr_images"] == 20
        assert summary["means"][row]["asr"] == round(recorded["asr"], 2)  # one attack: the mean is the cell
    assert summary["clean"]["asr"] is None  # the clean model has no trigger
    means = summary["means"]
    assert summary["rvpt_vs_baselines"] == {row: round(means[row]["asr"] - means["rvpt"]["asr"], 2)
                                            for row in ("none", "linear-probe")}
    assert set(summary["shots"]["badnet"]) == {"1", "2"} and set(summary["alpha"]["badnet"]) == {"0.0", "2.0"}
    assert summary["shots"]["badnet"]["2"] == summary["alpha"]["badnet"]["2.0"]  # both are the main RVPT run
    assert summary["cbpt_positive"]["farthest"]["badnet"]["ca"] == summary["table"]["cbpt"]["badnet"]["ca"]
    assert len(report["runs"]) == 2 + 3 + 2 + 2 + 2  # none x 2, 3 defenses, 2 sweep points, 2 + 2 ablations
    markdown = (out / "report.md").read_text()
    rvpt = summary["table"]["rvpt"]["badnet"]
    assert f"| rvpt | {rvpt['asr']:.2f} / {rvpt['ca']:.2f} |" in markdown
    assert "## CBPT: context length" in markdown and "## RVPT against shots" in markdown
    for row in ("none", "rvpt"):  # the default detection rows
        recorded = json.loads((out / "runs" / "badnet" / row / DETECTION_JSON).read_text())
        assert summary["detection"][row]["badnet"] == {key: recorded[key]
                                                       for key in ("asr", "alert", "strip", "adaptive")}
        assert recorded["alert"]["n_clean"] == 30 and recorded["strip"]["passes"] == 1 + STRIP_OVERLAYS
        assert recorded["settings"]["adaptive"] == {"weight": 10.0, "steps": 2}
        assert 0.0 <= recorded["alert"]["auroc"] <= 1.0 and 0.0 <= recorded["adaptive"]["evade@1"] <= 1.0
        alert, adaptive = recorded["alert"], recorded["adaptive"]
        assert (f"{alert['auroc']:.3f} / {100 * alert['tpr@1']:.1f} / {100 * alert['tpr@5']:.1f}") in markdown
        assert (f"{adaptive['auroc']:.3f} / {100 * adaptive['tpr@1']:.1f} / {100 * adaptive['tpr@5']:.1f} / "
                f"{100 * adaptive['asr']:.1f} / {100 * adaptive['evade@1']:.1f}") in markdown
    for plot in ("defenses", "shots", "alpha", "cbpt-ablations", "detection"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (out / "runs" / "badnet" / "rvpt" / RESULT_JSON).stat().st_mtime_ns
    detection_stamp = (out / "runs" / "badnet" / "rvpt" / DETECTION_JSON).stat().st_mtime_ns
    assert report_cli.main(arguments) == 0  # everything recorded: nothing is trained again
    again = json.loads((out / "report.json").read_text())
    assert all(run["reused"] for run in again["runs"]) and again["summary"] == summary
    assert (out / "runs" / "badnet" / "rvpt" / DETECTION_JSON).stat().st_mtime_ns == detection_stamp
    assert (out / "runs" / "badnet" / "rvpt" / RESULT_JSON).stat().st_mtime_ns == stamp
    # a changed setting retrains the runs it reaches, and only those
    assert report_cli.main([*arguments, "--set", "rvpt.lr=0.01"]) == 0
    changed = {run["run"]: run["reused"] for run in json.loads((out / "report.json").read_text())["runs"]}
    assert changed["rvpt"] is False and changed["rvpt-shots=1"] is False and changed["cbpt"] is True
    # without the adaptive attacker the detection is redone without it, and its cells say so
    assert report_cli.main([*arguments, "--set", "rvpt.lr=0.01", "--no-adaptive"]) == 0
    detection = json.loads((out / "report.json").read_text())["summary"]["detection"]
    assert all(detection[row]["badnet"]["adaptive"] is None for row in ("none", "rvpt"))


def test_parallel_runs_give_the_same_figures(zoo, tmp_path):
    plan = ReportPlan(attacks=("badnet",), clean=None, defenses=("rvpt",))
    serial = build_report(_settings(zoo, tmp_path / "serial"), plan, jobs=1)
    parallel = build_report(_settings(zoo, tmp_path / "parallel"), plan, jobs=2)
    assert parallel["summary"] == serial["summary"]


@pytest.mark.parametrize("arguments, message", [
    (["--attacks", "wanet"], "unknown attack"),
    (["--defenses", "rvpt,magic"], "unknown defense"),
    (["--set", "rvpt.epochs"], "STAGE.OPTION=VALUE"),
    (["--set", "text.epochs=1"], "unknown stage"),
    (["--sweep-shots", "1,two"], "comma-separated numbers"),
    (["--defenses", "none,rvpt", "--ablation-attacks", "badnet"], "add cbpt"),
    (["--jobs", "0"], "jobs"),
    (["--detection-images", "0"], "detection_images"),
    (["--adaptive-steps", "0"], "adaptive_steps"),
    (["--defenses", "none,rvpt+cbpt", "--set", "rvpt.unlearn_weight=1"],
     "rvpt.unlearn_weight does not apply to any defense of the report (none, rvpt+cbpt); it is a setting of unlearn"),
    (["--defenses", "none,rvpt+cbpt", "--set", "rvpt.distill_weight=1"], "rvpt.distill_weight does not apply"),
    (["--defenses", "none,rvpt", "--set", "rvpt.epochs=many"], "rvpt setting 'epochs' must be int"),
    (["--adaptive-weight", "-1"], "adaptive_weight"),
    (["--defenses", "none,cbpt", "--detection", "rvpt"], "detection on ['rvpt']"),
])
def test_bad_requests_exit_2_and_say_why(zoo, tmp_path, capsys, arguments, message):
    out = tmp_path / "report"
    assert report_cli.main(["--zoo", str(zoo), "--out", str(out), "--data", "digits", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "report.json").exists()


def test_a_zoo_without_backdoored_models_is_an_input_error(zoo, tmp_path):
    with pytest.raises(InputError, match="no backdoored model"):
        report_cli.zoo_models(zoo / CLEAN)
    with pytest.raises(InputError, match="not a directory"):
        report_cli.zoo_models(tmp_path / "missing")
