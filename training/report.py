"""The evaluation report: every defense against every backdoored model of a zoo.

    python -m training.report --zoo ZOO --out REPORT_DIR            # the full report
    python -m training.report --zoo ZOO --out REPORT_DIR --attacks badnet --defenses none,rvpt \\
        --no-sweeps --no-cbpt-ablations --test-limit 500 --set rvpt.epochs=5   # a quick look

Each backdoored model ZOO/<attack> (a folder with trigger.json) gets every defense,
trained through `training.purify` on the same data, shots and seed and evaluated on
the same test images; ZOO/clean, when present, is evaluated as the reference. Sweeps
train RVPT with 1/2/4/8/16 shots and alpha 0/1/2/4/8 on the sweep attacks; the CBPT
ablations vary the positive sample (farthest / closest / random) and the context
length (1/2/4/8/16) on every attack. The undefended and the RVPT-purified models
also get the trigger-alert evaluation of training.detection (the default alert,
STRIP, and the adaptive attacker against the default alert: AUROC and TPR at 1 % and
5 % FPR, and the triggered images that evade). Written to REPORT_DIR:

    report.json          settings, every run's CA / ASR / PR, and the tables' figures
    report.md            Table 1 (rows defenses, columns attacks, ASR / CA per cell),
                         RVPT against each baseline, PR, sweeps and CBPT ablations
    defenses.png         grouped bars of ASR and CA per attack and defense
    shots.png, alpha.png ASR and CA of RVPT against shots and against alpha
    detection.png        the trigger alert against STRIP and the adaptive attacker
    cbpt-ablations.png   CBPT's positive-sample and context-length ablations
    runs/<model>/<run>/  each run's artifact, its result.json (and detection.json)

A run whose result.json records the same settings is reused, so an interrupted report
resumes where it stopped (--force retrains). --jobs N trains N runs at once, each in
its own process with one torch thread. The defenses are training/defenses/'s registry:
the rows are those it marks for the report, and a registered defense can be named in
--defenses.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from guard import console
from guard.errors import InputError
from guard.hashing import sha256_file

from .attacks import TRIGGER_JSON, load_trigger
from .detection import DEFAULT as DEFAULT_ALERT
from .data import DATA_HELP
from .detection import run_detection
from .evaluate import Evaluation
from . import defenses
from .configs import parse_assignments
from .purify import purify

log = logging.getLogger(__name__)

CLEAN = "clean"  # the zoo's reference model, evaluated without defense
UNDEFENDED = "none"
SWEEP_SHOTS = (1, 2, 4, 8, 16)
SWEEP_ALPHAS = (0.0, 1.0, 2.0, 4.0, 8.0)
CBPT_POSITIVES = ("farthest", "closest", "random")
CBPT_CONTEXTS = (1, 2, 4, 8, 16)
RESULT_JSON = "result.json"
DETECTION_JSON = "detection.json"
ARTIFACT = "artifact"
STRIP_OVERLAYS = 8  # the reference detector, given 4x the default alert's 2 extra passes


def stages() -> tuple[str, ...]:
    """--set STAGE.OPTION=VALUE's stages: those of the registered defenses (Defense.stages),
    so a setting reaches every method with that stage (rvpt.epochs also sets rvpt+cbpt's
    RVPT stage), unless the method fixes it (vpt's alpha, ft's self-supervised weight)."""
    return tuple(dict.fromkeys(stage for defense in defenses.REGISTRY.values() for stage in defense.stages))


@dataclass(frozen=True)
class Run:
    """One defense trained on one zoo model. `options` are this run's own settings on
    top of the report's (a sweep point), as sorted (name, value) pairs."""
    model: str
    method: str
    options: tuple = ()

    @property
    def name(self) -> str:
        return "-".join([self.method, *(f"{key}={value}" for key, value in self.options)])


@dataclass(frozen=True)
class ReportSettings:
    zoo: Path
    out: Path
    data: str = "fashion-mnist"
    shots: int = 16
    test_limit: Optional[int] = None
    pr_images: int = 2000
    seed: int = 0
    detection_images: int = 2000  # clean test images of the trigger-alert evaluation
    adaptive_weight: Optional[float] = 10.0  # the adaptive attacker's alert weight (None: no attacker)
    adaptive_steps: int = 100
    stage_settings: tuple = ()  # ((stage, ((option, value), ...)), ...) from --set

    def __post_init__(self):
        for name, value, least in (("shots", self.shots, 1), ("pr_images", self.pr_images, 0),
                                   ("detection_images", self.detection_images, 1),
                                   ("adaptive_steps", self.adaptive_steps, 1),
                                   ("test_limit", 1 if self.test_limit is None else self.test_limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an integer of at least {least}, got {value!r}")
        if self.adaptive_weight is not None and (isinstance(self.adaptive_weight, bool)
                                                 or not isinstance(self.adaptive_weight, (int, float))
                                                 or not self.adaptive_weight >= 0):
            raise InputError(f"adaptive_weight must be a number >= 0 or None, got {self.adaptive_weight!r}")

    def stage(self, name: str) -> dict:
        return dict(dict(self.stage_settings).get(name, ()))


def zoo_models(zoo: Path) -> tuple[Optional[str], list[str]]:
    """(the clean model's folder name or None, the backdoored models' names, sorted)."""
    if not zoo.is_dir():
        raise InputError(f"zoo {zoo} is not a directory (build one with `python -m training.zoo --out {zoo}`)")
    attacks = sorted(path.name for path in zoo.iterdir() if (path / TRIGGER_JSON).is_file())
    if not attacks:
        raise InputError(f"zoo {zoo} holds no backdoored model (no sub-folder with {TRIGGER_JSON}); "
                         f"build one with `python -m training.zoo --out {zoo}`")
    return (CLEAN if (zoo / CLEAN).is_dir() else None), attacks


def make_run(model: str, method: str, settings: ReportSettings, **options) -> Run:
    """The run of `method` on `model` with sweep `options` (shots, alpha, positive,
    num_context); an option equal to the report's own setting is dropped, so a sweep
    point at the report's setting is the main run itself."""
    defaults = {"shots": settings.shots,
                "alpha": settings.stage("rvpt").get("alpha", _default("rvpt", "alpha")),
                "positive": settings.stage("cbpt").get("positive", _default("cbpt", "positive")),
                "num_context": settings.stage("cbpt").get("num_context", _default("cbpt", "num_context"))}
    return Run(model, method, tuple(sorted((key, value) for key, value in options.items() if value != defaults[key])))


@dataclass(frozen=True)
class ReportPlan:
    """Which models, defenses, sweeps and ablations the report covers."""
    attacks: tuple[str, ...]
    clean: Optional[str]
    defenses: tuple[str, ...] = field(default_factory=lambda: defenses.names("report"))
    sweep_attacks: tuple[str, ...] = ()
    sweep_shots: tuple[int, ...] = SWEEP_SHOTS
    sweep_alphas: tuple[float, ...] = SWEEP_ALPHAS
    ablation_attacks: tuple[str, ...] = ()
    ablation_contexts: tuple[int, ...] = CBPT_CONTEXTS
    detection: tuple[str, ...] = ()  # rows whose models get the trigger-alert evaluation

    def __post_init__(self):
        unknown = [name for name in self.defenses if name not in defenses.REGISTRY]
        if unknown:
            raise InputError(f"unknown defense(s) {unknown}; available: {', '.join(defenses.names())}")
        strays = sorted(set(self.sweep_attacks + self.ablation_attacks) - set(self.attacks))
        if strays:
            raise InputError(f"sweep or ablation attack(s) {strays} are not among the report's attacks "
                             f"{list(self.attacks)}")
        if self.ablation_attacks and "cbpt" not in self.defenses:
            raise InputError("the CBPT ablations compare against CBPT: add cbpt to the defenses")
        if set(self.detection) - set(self.rows):
            raise InputError(f"detection on {sorted(set(self.detection) - set(self.rows))}: only the report's own "
                             f"rows {list(self.rows)} have models to evaluate")
        if self.sweep_attacks and "rvpt" not in self.defenses:
            raise InputError("the shots and alpha sweeps are RVPT's: add rvpt to the defenses")

    @property
    def rows(self) -> tuple[str, ...]:
        """Table 1's rows: the undefended model first, then each defense."""
        return (UNDEFENDED, *(name for name in self.defenses if name != UNDEFENDED))

    def runs(self, settings: ReportSettings) -> list[Run]:
        """Every run of the report, each once, the undefended ones included."""
        runs = [make_run(self.clean, UNDEFENDED, settings)] if self.clean else []
        runs += [make_run(attack, method, settings) for attack in self.attacks for method in self.rows]
        for attack in self.sweep_attacks:
            runs += [make_run(attack, "rvpt", settings, shots=shots) for shots in self.sweep_shots]
            runs += [make_run(attack, "rvpt", settings, alpha=float(alpha)) for alpha in self.sweep_alphas]
        for attack in self.ablation_attacks:
            runs += [make_run(attack, "cbpt", settings, positive=positive) for positive in CBPT_POSITIVES]
            runs += [make_run(attack, "cbpt", settings, num_context=length) for length in self.ablation_contexts]
        return list(dict.fromkeys(runs))


def purify_arguments(run: Run, settings: ReportSettings) -> dict:
    """The keyword arguments of `training.purify.purify` for a run (model and out aside)."""
    options = dict(run.options)
    defense = defenses.get(run.method)
    keys = set(defense.keys())
    chosen = {}
    for stage, prefix in defense.stages.items():
        chosen.update({prefix + key: value for key, value in settings.stage(stage).items()
                       if prefix + key in keys})  # not what the method fixes (vpt's alpha)
    shots = options.pop("shots", settings.shots)
    for key, value in options.items():  # a sweep option belongs to the method's last stage
        chosen[list(defense.stages.values())[-1] + key] = value
    return {"method": run.method, "shots": shots, "seed": settings.seed, "pr_images": settings.pr_images,
            "test_limit": settings.test_limit, "settings": chosen}


def check_settings(runs: Sequence[Run], settings: ReportSettings) -> None:
    """Refuse, before anything trains, a --set of a stage the report trains that reaches
    none of its runs, and a value of the wrong type. (A stage no run has, such as cbpt in
    a report without CBPT, is left alone, as a shared --set list may name it.)"""
    trained = {stage for run in runs for stage in defenses.get(run.method).stages}
    for stage in (stage for stage, _ in settings.stage_settings if stage in trained):
        for key in settings.stage(stage):
            if not any(prefix + key in defenses.get(run.method).keys()
                       for run in runs for name, prefix in defenses.get(run.method).stages.items() if name == stage):
                owners = [name for name, defense in defenses.REGISTRY.items()
                          if any(prefix + key in defense.keys() for name_, prefix in defense.stages.items()
                                 if name_ == stage)]
                raise InputError(f"{stage}.{key} does not apply to any defense of the report "
                                 f"({', '.join(dict.fromkeys(run.method for run in runs))})"
                                 + (f"; it is a setting of {', '.join(owners)}" if owners else
                                    f"; {stage} settings: see python -m training.purify --help-method"))
    for run in runs:
        defenses.settings_of(run.method, purify_arguments(run, settings)["settings"])


def run_settings(run: Run, settings: ReportSettings) -> dict:
    """What determines a run's result: the model's weights, the data and the arguments."""
    directory = settings.zoo / run.model
    files = sorted(path for path in directory.iterdir()
                   if path.suffix in (".safetensors", ".pt", ".bin") or path.name == TRIGGER_JSON)
    return {"model": run.model, "model_sha256": {path.name: sha256_file(path) for path in files}, "data": settings.data,
            "arguments": purify_arguments(run, settings)}


def execute(run: Run, settings: ReportSettings, before: Optional[dict], force: bool = False,
            threads: Optional[int] = None) -> dict:
    """Train and evaluate one run (or reuse its recorded result); returns result.json's content."""
    if threads:
        torch.set_num_threads(threads)
    out = settings.out / "runs" / run.model / run.name
    wanted = run_settings(run, settings)
    record = None if force else _recorded(out / RESULT_JSON, wanted)
    if record is None:
        result = purify(str(settings.zoo / run.model), settings.data, out / ARTIFACT,
                        before=None if before is None else Evaluation(**before), **wanted["arguments"])
        record = {"settings": wanted, "reused": False, **result.to_dict()}
        (out / RESULT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def detect(run: Run, settings: ReportSettings, force: bool = False, threads: Optional[int] = None) -> dict:
    """The default trigger alert, STRIP with as many passes and the adaptive attacker
    against the default alert, on a trained run's artifact (or their recorded figures);
    returns detection.json's content. "adaptive" is None where the attacker was switched
    off or the trigger has no tensors for it to optimise (SIG)."""
    if threads:
        torch.set_num_threads(threads)
    out = settings.out / "runs" / run.model / run.name
    adaptive = (settings.adaptive_weight is not None
                and bool(load_trigger(settings.zoo / run.model).trigger.tensors()))
    wanted = {"run": run_settings(run, settings), "images": settings.detection_images, "seed": settings.seed,
              "alert": DEFAULT_ALERT.to_dict(), "strip": STRIP_OVERLAYS,
              "adaptive": {"weight": settings.adaptive_weight, "steps": settings.adaptive_steps} if adaptive else None}
    record = None if force else _recorded(out / DETECTION_JSON, wanted)
    if record is None:
        result = run_detection(str(out / ARTIFACT), settings.zoo / run.model, settings.data,
                               settings.detection_images, (DEFAULT_ALERT,), (STRIP_OVERLAYS,),
                               (settings.adaptive_weight,) if adaptive else (), settings.adaptive_steps,
                               density_images=0, seed=settings.seed)
        record = {"settings": wanted, "reused": False, "asr": result["asr"],
                  "alert": _detection_figures(next(iter(result["candidates"].values()))),
                  "strip": _detection_figures(result["strip"][f"strip-{STRIP_OVERLAYS}"]),
                  "adaptive": _detection_figures(result["adaptive"][0], "asr", "evade@1") if adaptive else None}
        (out / DETECTION_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _detection_figures(entry: dict, *extra: str) -> dict:
    return {key: entry[key] for key in ("auroc", "tpr@1", "tpr@5", "passes", "n_clean", "n_triggered", *extra)}


def _recorded(path: Path, wanted: dict) -> Optional[dict]:
    """A record written for exactly `wanted` settings, marked reused; else None."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # never written, or cut short by an interruption
        return None
    return {**record, "reused": True} if record.get("settings") == wanted else None


def run_all(runs: Sequence[Run], settings: ReportSettings, jobs: int = 1, force: bool = False,
            progress: bool = False) -> dict[Run, dict]:
    """Every run, undefended ones first: their evaluation is the `before` of the model's
    defenses, so no model is evaluated twice."""
    results: dict[Run, dict] = {}
    undefended = [run for run in runs if run.method == UNDEFENDED]
    missing = sorted({run.model for run in runs} - {run.model for run in undefended})
    if missing:
        raise InputError(f"no undefended run of {missing}: the report evaluates every model without defense first")
    bar = console.progress(total=len(runs), desc="report", enabled=progress)
    for phase in (undefended, [run for run in runs if run.method != UNDEFENDED]):
        calls = {run: (run, settings, None if run.method == UNDEFENDED
                       else results[Run(run.model, UNDEFENDED)]["before"], force) for run in phase}
        for run, record in _parallel(execute, calls, jobs):
            results[run] = record
            after = record["after"]
            asr = "-" if after["asr"] is None else f"{after['asr']:.2f}"
            bar.update()
            log.info("%s/%s: CA %.2f ASR %s (%.0f s)", run.model, run.name, after["ca"], asr, record["seconds"])
    bar.close()
    return results


def detect_all(runs: Sequence[Run], settings: ReportSettings, jobs: int = 1, force: bool = False,
               progress: bool = False) -> dict[Run, dict]:
    results = {}
    calls = {run: (run, settings, force) for run in runs}
    for run, record in console.progress(_parallel(detect, calls, jobs), total=len(runs), desc="detection",
                                        enabled=progress):
        results[run] = record
        log.info("%s/%s: alert AUROC %.3f TPR@1%% %.3f; STRIP-%d AUROC %.3f", run.model, run.name,
                 record["alert"]["auroc"], record["alert"]["tpr@1"], STRIP_OVERLAYS, record["strip"]["auroc"])
    return results


def _parallel(function, calls: dict, jobs: int) -> Iterable[tuple]:
    """(key, function(*calls[key])) as calls finish; in this process when jobs == 1, else
    in `jobs` worker processes with one torch thread each."""
    if jobs == 1:
        for key, arguments in calls.items():
            yield key, function(*arguments)
        return
    # spawn: a fork would copy this process's torch thread pool state into the workers
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(function, *arguments, threads=1): key for key, arguments in calls.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


# --------------------------------------------------------------------------- tables


def summarise(results: dict[Run, dict], detections: dict[Run, dict], plan: ReportPlan,
              settings: ReportSettings) -> dict:
    """The report's figures, JSON-ready, from the runs' records."""
    def cell(model: str, method: str, **options) -> dict:
        after = results[make_run(model, method, settings, **options)]["after"]
        return {"asr": after["asr"], "asr_all": after["asr_all"], "ca": after["ca"], "pr": after["pr"]}

    table = {row: {attack: cell(attack, row) for attack in plan.attacks} for row in plan.rows}
    means = {row: _mean(cells.values()) for row, cells in table.items()}
    pr_columns = {**({CLEAN: [cell(plan.clean, UNDEFENDED)]} if plan.clean else {}),
                  **{row: list(table[row].values()) for row in plan.rows}}
    summary = {"attacks": list(plan.attacks), "rows": list(plan.rows), "table": table, "means": means,
               "clean": cell(plan.clean, UNDEFENDED) if plan.clean else None,
               "pr": {column: _mean_pr(cells) for column, cells in pr_columns.items()}}
    if "rvpt" in plan.defenses:
        # positive: RVPT's mean ASR is that many points lower than the baseline's
        summary["rvpt_vs_baselines"] = {row: round(means[row]["asr"] - means["rvpt"]["asr"], 2)
                                        for row in plan.rows if defenses.get(row).baseline}
        summary["rvpt_pr_not_raised"] = {
            attack: sorted(name for name, value in table["rvpt"][attack]["pr"].items()
                           if not value > table[UNDEFENDED][attack]["pr"].get(name, float("inf")))
            for attack in plan.attacks}
    if plan.sweep_attacks:
        summary["shots"] = {attack: {str(shots): cell(attack, "rvpt", shots=shots) for shots in plan.sweep_shots}
                            for attack in plan.sweep_attacks}
        summary["alpha"] = {attack: {str(float(alpha)): cell(attack, "rvpt", alpha=float(alpha))
                                     for alpha in plan.sweep_alphas} for attack in plan.sweep_attacks}
    if plan.detection:
        summary["detection"] = {row: {attack: {key: detections[make_run(attack, row, settings)][key]
                                               for key in ("asr", "alert", "strip", "adaptive")}
                                      for attack in plan.attacks}
                                for row in plan.detection}
    if plan.ablation_attacks:
        for key, option, values in (("cbpt_positive", "positive", CBPT_POSITIVES),
                                    ("cbpt_context", "num_context", plan.ablation_contexts)):
            summary[key] = {}
            for value in values:
                cells = {attack: cell(attack, "cbpt", **{option: value}) for attack in plan.ablation_attacks}
                summary[key][str(value)] = {"mean": _mean(cells.values()), **cells}
    return summary



def _default(method: str, name: str):
    """A method's default of one setting."""
    return getattr(defenses.get(method).settings(), name)


def _mean(cells: Iterable[dict]) -> dict:
    cells = list(cells)
    asrs = [cell["asr"] for cell in cells if cell["asr"] is not None]
    return {"asr": round(sum(asrs) / len(asrs), 2) if asrs else None,
            "ca": round(sum(cell["ca"] for cell in cells) / len(cells), 2),
            "max_asr": max(asrs) if asrs else None}


def _mean_pr(cells: Sequence[dict]) -> dict:
    names = sorted({name for cell in cells for name in cell["pr"]})
    return {name: round(sum(cell["pr"][name] for cell in cells if name in cell["pr"])
                        / sum(name in cell["pr"] for cell in cells), 4) for name in names}


# --------------------------------------------------------------------------- Markdown


def markdown(summary: dict, header: str) -> str:
    """The report as Markdown; `header` says how it was made."""
    attacks, rows = summary["attacks"], summary["rows"]
    lines = ["# clip-guard evaluation report", "", header, ""]
    if summary["clean"]:
        lines += [f"Clean reference model (no backdoor): CA {summary['clean']['ca']:.2f} %.", ""]
    lines += ["## Table 1: ASR / CA (%) per attack", "",
              "ASR counts triggered test images whose true class is not the target (BackdoorBench); "
              "report.json also has ASR over all images (`asr_all`).", ""]
    lines += _table(["defense", *attacks, "mean", "max ASR"],
                    [[row, *(_pair(summary["table"][row][attack]) for attack in attacks), _pair(summary["means"][row]),
                      _number(summary["means"][row]["max_asr"])] for row in rows])
    if "rvpt_vs_baselines" in summary:
        rvpt = summary["means"]["rvpt"]
        lines += ["", "## RVPT against the baselines (mean over attacks)", "",
                  f"RVPT: mean ASR {_number(rvpt['asr'])} %, mean CA {rvpt['ca']:.2f} %.", ""]
        lines += _table(["baseline", "mean ASR %", "mean CA %", "RVPT's mean ASR lower by (points)"],
                        [[row, _number(summary["means"][row]["asr"]), f"{summary['means'][row]['ca']:.2f}",
                          f"{difference:+.2f}"] for row, difference in summary["rvpt_vs_baselines"].items()])
    columns = list(summary["pr"])
    names = sorted({name for column in columns for name in summary["pr"][column]})
    lines += ["", "## Perturbation resistivity (PR; mean over attacks)", ""]
    lines += _table(["perturbation", *columns], [[name, *(_number(summary["pr"][column].get(name), 3)
                                                           for column in columns)] for name in names])
    if "rvpt_pr_not_raised" in summary:
        failures = {attack: names for attack, names in summary["rvpt_pr_not_raised"].items() if names}
        lines += ["", "RVPT raises PR over the backdoored model for every perturbation on "
                  f"{len(attacks) - len(failures)} of {len(attacks)} attacks"
                  + ("." if not failures else "; not raised: "
                     + "; ".join(f"{attack}: {', '.join(names)}" for attack, names in failures.items()) + ".")]
    for key, title, label in (("shots", "RVPT against shots", "shots"), ("alpha", "RVPT against alpha", "alpha")):
        if key in summary:
            sweep_attacks = list(summary[key])
            values = list(summary[key][sweep_attacks[0]])
            lines += ["", f"## {title} (ASR / CA %)", ""]
            lines += _table([label, *sweep_attacks], [[value, *(_pair(summary[key][attack][value])
                                                                for attack in sweep_attacks)] for value in values])
    if "detection" in summary:
        rows_measured = list(summary["detection"])
        lines += ["", "## Trigger alerts: the default PR alert against STRIP and an adaptive attacker", "",
                  f"AUROC / TPR at 1 % FPR / TPR at 5 % FPR (%), clean test images against the same images "
                  f"triggered (target class left out). The default alert makes 2 extra forward passes per image, "
                  f"STRIP-{STRIP_OVERLAYS} makes {STRIP_OVERLAYS}. The adaptive attacker re-optimises the trigger's "
                  f"own tensors against the default alert (training.detection.adaptive_trigger); its cells add the "
                  f"ASR of the adapted trigger and the triggered images that reach the target unflagged at 1 % FPR "
                  f"(AUROC / TPR@1 / TPR@5 / ASR / evade, %). '-': a trigger with nothing to optimise (SIG), or "
                  f"the attacker was switched off.", ""]
        lines += _table(["attack", *(f"{row}: {detector}" for row in rows_measured
                                     for detector in ("alert", f"STRIP-{STRIP_OVERLAYS}", "adaptive"))],
                        [[attack, *(_detection_cell(summary["detection"][row][attack][detector])
                                    for row in rows_measured for detector in ("alert", "strip", "adaptive"))]
                         for attack in attacks])
    for key, title in (("cbpt_positive", "CBPT: positive-sample selection"), ("cbpt_context", "CBPT: context length")):
        if key in summary:
            ablation_attacks = [name for name in next(iter(summary[key].values())) if name != "mean"]
            lines += ["", f"## {title} (ASR / CA %)", ""]
            lines += _table(["setting", "mean", *ablation_attacks],
                            [[value, _pair(cells["mean"]), *(_pair(cells[attack]) for attack in ablation_attacks)]
                             for value, cells in summary[key].items()])
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(value) for value in row) + " |" for row in rows)]


def _number(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _detection_cell(figures: Optional[dict]) -> str:
    if figures is None:
        return "-"
    cell = f"{figures['auroc']:.3f} / {100 * figures['tpr@1']:.1f} / {100 * figures['tpr@5']:.1f}"
    if "evade@1" in figures:
        cell += f" / {100 * figures['asr']:.1f} / {100 * figures['evade@1']:.1f}"
    return cell


def _pair(cell: dict) -> str:
    return f"{_number(cell['asr'])} / {cell['ca']:.2f}"


# --------------------------------------------------------------------------- plots


def plot_report(summary: dict, out: Path) -> list[Path]:
    """defenses.png always; shots.png, alpha.png and cbpt-ablations.png when measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    written = []
    attacks, rows = summary["attacks"], summary["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(attacks) + 4), 4.5))
    width = 0.8 / len(rows)
    for axis, metric in zip(axes, ("asr", "ca")):
        for index, row in enumerate(rows):
            values = [summary["table"][row][attack][metric] or 0.0 for attack in attacks]
            values.append(summary["means"][row][metric] or 0.0)
            axis.bar([position + (index - (len(rows) - 1) / 2) * width for position in range(len(attacks) + 1)],
                     values, width, label=row)
        axis.set_xticks(range(len(attacks) + 1), [*attacks, "mean"], rotation=30)
        axis.set_ylim(0, 100)
        axis.set_ylabel("%")
        axis.set_title("attack success rate (ASR)" if metric == "asr" else "clean accuracy (CA)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: bars fill both panels
    written.append(save_figure(figure, out / "defenses.png", dpi=120))
    for key, label in (("shots", "shots per class"), ("alpha", "alpha (weight of the FR loss)")):
        if key in summary:
            figure, axes = plt.subplots(1, 2, figsize=(10, 4))
            for attack, points in summary[key].items():
                xs = [float(value) for value in points]
                for axis, metric in zip(axes, ("asr", "ca")):
                    axis.plot(xs, [points[value][metric] or 0.0 for value in points], marker="o", label=attack)
            for axis, metric in zip(axes, ("ASR %", "CA %")):
                axis.set_xlabel(label)
                axis.set_ylabel(metric)
                axis.set_ylim(0, 100)
                if key == "shots":
                    axis.set_xscale("log", base=2)
                axis.legend(fontsize=8)
            axes[0].set_title(f"RVPT: ASR against {key}")
            axes[1].set_title(f"RVPT: CA against {key}")
            written.append(save_figure(figure, out / f"{key}.png", dpi=120))
    if "detection" in summary:
        figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(attacks) + 3), 4))
        names = {"alert": "alert", "strip": f"STRIP-{STRIP_OVERLAYS}", "adaptive": "alert vs adaptive attacker"}
        bars = [(row, detector) for row in summary["detection"] for detector in names
                if any(summary["detection"][row][attack][detector] for attack in attacks)]
        width = 0.8 / len(bars)
        for index, (row, detector) in enumerate(bars):
            figures = [summary["detection"][row][attack][detector] for attack in attacks]
            axis.bar([position + (index - (len(bars) - 1) / 2) * width for position in range(len(attacks))],
                     [100 * entry["tpr@1"] if entry else float("nan") for entry in figures], width,
                     label=f"{row}: {names[detector]}")
        axis.set_xticks(range(len(attacks)), attacks, rotation=30)
        axis.set_ylim(0, 100)
        axis.set_ylabel("TPR at 1 % FPR (%)")
        axis.set_title("trigger alerts: triggered images caught at 1 % false alarms")
        axis.legend(fontsize=8)
        written.append(save_figure(figure, out / "detection.png", dpi=120))
    if "cbpt_positive" in summary:
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, key, title in ((axes[0], "cbpt_positive", "positive sample"),
                                 (axes[1], "cbpt_context", "context length")):
            settings = list(summary[key])
            for offset, metric in ((-0.2, "asr"), (0.2, "ca")):
                axis.bar([position + offset for position in range(len(settings))],
                         [summary[key][value]["mean"][metric] or 0.0 for value in settings], 0.4,
                         label=f"mean {metric.upper()}")
            axis.set_xticks(range(len(settings)), settings)
            axis.set_ylim(0, 100)
            axis.set_ylabel("%")
            axis.set_title(f"CBPT: {title}")
            axis.legend(fontsize=8)
        written.append(save_figure(figure, out / "cbpt-ablations.png", dpi=120))
    return written


# --------------------------------------------------------------------------- command line


def build_report(settings: ReportSettings, plan: ReportPlan, jobs: int = 1, force: bool = False,
                 progress: bool = False, command: str = "") -> dict:
    """Run (or reuse) every run of the plan and write report.json, report.md and the plots."""
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    runs = plan.runs(settings)
    check_settings(runs, settings)  # refused before any run trains, not when the report reaches it
    started = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    results = run_all(runs, settings, jobs, force, progress)
    detections = detect_all([make_run(attack, row, settings) for row in plan.detection for attack in plan.attacks],
                            settings, jobs, force, progress)
    summary = summarise(results, detections, plan, settings)
    seconds = time.perf_counter() - started
    trained = [record for record in results.values() if not record["reused"]]
    header = (f"{settings.data}, {settings.shots} shots per class, seed {settings.seed}, "
              f"{next(iter(results.values()))['after']['num_images']} test images (PR on "
              f"{next(iter(results.values()))['after']['num_pr_images']}); {len(runs)} runs "
              f"({sum(record['seconds'] for record in results.values()) / 60:.0f} min of training and evaluation, "
              f"summed over runs), {len(trained)} of them trained by this invocation, whose wall time was "
              f"{seconds / 60:.1f} min.\n\n`{command}`")
    report = {"command": command, "seconds": round(seconds, 1),
              "settings": {"zoo": str(settings.zoo), "data": settings.data, "shots": settings.shots,
                           "test_limit": settings.test_limit, "pr_images": settings.pr_images, "seed": settings.seed,
                           "set": {stage: settings.stage(stage) for stage in stages() if settings.stage(stage)}},
              "summary": summary,
              "runs": [{"model": run.model, "run": run.name, "method": run.method, "options": dict(run.options),
                        "reused": record["reused"], "seconds": record["seconds"],
                        "train_seconds": record["train_seconds"], "after": record["after"]}
                       for run, record in results.items()]}
    (settings.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (settings.out / "report.md").write_text(markdown(summary, header))
    plot_report(summary, settings.out)
    return report


def parse_settings(values: Sequence[str]) -> tuple:
    """--set STAGE.OPTION=VALUE items as ReportSettings.stage_settings; VALUE is JSON
    (a number, true, ...) or else a string (training.configs.parse_assignments, as
    training.purify's --set)."""
    form = "STAGE.OPTION=VALUE (e.g. rvpt.epochs=5)"
    known = stages()
    by_stage: dict[str, dict] = {}
    for name, value in parse_assignments(values, form).items():
        stage, dot, option = name.partition(".")
        if not dot or not option:
            raise InputError(f"--set takes {form}, got {name!r}")
        if stage not in known:
            raise InputError(f"--set {name!r}: unknown stage {stage!r}; stages: {', '.join(known)}")
        by_stage.setdefault(stage, {})[option] = value
    return tuple((stage, tuple(sorted(options.items()))) for stage, options in sorted(by_stage.items()))


def _names(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma-separated selection from `known` ("all" for every one, "" for none)."""
    if value == "all":
        return tuple(known)
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(f"unknown {what} {unknown}; available: {', '.join(known)}")
    return names


def _detection_rows(args, rows: Sequence[str]) -> tuple[str, ...]:
    if args.no_detection:
        return ()
    if args.detection is None:
        return tuple(row for row in (UNDEFENDED, "rvpt") if row == UNDEFENDED or row in rows)
    return _names(args.detection, defenses.names(), "detection row")


def _numbers(value: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(item) for item in value.split(","))
    except ValueError:
        raise InputError(f"{option} takes comma-separated numbers, got {value!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__, epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, type=Path, help="zoo directory (python -m training.zoo)")
    parser.add_argument("--out", required=True, type=Path, help="report directory to write")
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--attacks", default="all", help="comma-separated backdoored models of the zoo (all)")
    parser.add_argument("--defenses", default=",".join(defenses.names("report")),
                        help=f"comma-separated, of {','.join(defenses.names())} (default: "
                             f"{','.join(defenses.names('report'))})")
    parser.add_argument("--shots", type=int, default=16, help="clean labelled images per class (16)")
    parser.add_argument("--sweep-attacks", help="comma-separated attacks of RVPT's shots and alpha sweeps, or "
                        "all (default: badnet, else the first attack; none without rvpt among the defenses)")
    parser.add_argument("--sweep-shots", default=",".join(map(str, SWEEP_SHOTS)), help="shots of the sweep")
    parser.add_argument("--sweep-alphas", default=",".join(map(str, SWEEP_ALPHAS)), help="alphas of the sweep")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the shots and alpha sweeps")
    parser.add_argument("--ablation-attacks", help="comma-separated attacks of CBPT's positive and context-length "
                        "ablations, or all (default: all; none without cbpt among the defenses)")
    parser.add_argument("--cbpt-contexts", default=",".join(map(str, CBPT_CONTEXTS)),
                        help="context lengths of CBPT's ablation")
    parser.add_argument("--no-cbpt-ablations", action="store_true", help="skip CBPT's ablations")
    parser.add_argument("--detection", help="rows whose models get the trigger-alert evaluation, comma-separated "
                        "(default: none and rvpt, those of them among the rows)")
    parser.add_argument("--detection-images", type=int, default=2000, help="clean test images of that evaluation")
    parser.add_argument("--no-detection", action="store_true", help="skip the trigger-alert evaluation")
    parser.add_argument("--adaptive-weight", type=float, default=10.0,
                        help="alert-score weight of the adaptive attacker in that evaluation (10)")
    parser.add_argument("--adaptive-steps", type=int, default=100, help="its optimisation steps (100)")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive attacker")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                        help=f"a training setting for every run with that stage (stages: {', '.join(stages())}); "
                             "the keys of python -m training.purify --help-method METHOD, e.g. rvpt.epochs=5")
    parser.add_argument("--test-limit", type=int, help="evaluate on a seeded subset of this many test images")
    parser.add_argument("--pr-images", type=int, default=2000, help="test images used for PR (0 skips PR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process and thread each")
    parser.add_argument("--force", action="store_true", help="retrain runs whose results are recorded")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    console.setup_logging()
    clean, available = zoo_models(args.zoo)
    attacks = _names(args.attacks, available, "attack")
    rows = _names(args.defenses, defenses.names(), "defense")
    sweep_attacks = ("badnet",) if "badnet" in attacks else attacks[:1]
    if args.no_sweeps or (args.sweep_attacks is None and "rvpt" not in rows):
        sweep_attacks = ()
    elif args.sweep_attacks is not None:
        sweep_attacks = _names(args.sweep_attacks, attacks, "sweep attack")
    ablation_attacks = attacks if "cbpt" in rows else ()
    if args.no_cbpt_ablations:
        ablation_attacks = ()
    elif args.ablation_attacks is not None:
        ablation_attacks = _names(args.ablation_attacks, attacks, "ablation attack")
    plan = ReportPlan(attacks=attacks, clean=clean, defenses=rows, sweep_attacks=sweep_attacks,
                      sweep_shots=_numbers(args.sweep_shots, int, "--sweep-shots"),
                      sweep_alphas=_numbers(args.sweep_alphas, float, "--sweep-alphas"),
                      ablation_attacks=ablation_attacks,
                      ablation_contexts=_numbers(args.cbpt_contexts, int, "--cbpt-contexts"),
                      detection=_detection_rows(args, rows))
    settings = ReportSettings(args.zoo, args.out, args.data, args.shots, args.test_limit, args.pr_images,
                              args.seed, args.detection_images,
                              None if args.no_adaptive else args.adaptive_weight, args.adaptive_steps,
                              parse_settings(args.set))
    command = "python -m training.report " + " ".join(sys.argv[1:] if argv is None else argv)
    report = build_report(settings, plan, args.jobs, args.force, not args.no_progress, command)
    print(markdown(report["summary"], f"wall time {report['seconds'] / 60:.1f} min"))
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.json'} and plots")
    return console.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
