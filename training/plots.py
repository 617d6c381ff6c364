"""Plots of evaluation results (matplotlib, imported only when a plot is drawn)."""
from __future__ import annotations

from pathlib import Path

from .evaluate import Evaluation


def plot_summary(rows: dict[str, Evaluation], out: str | Path) -> Path:
    """Two panels: CA and ASR per model, and PR per perturbation per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    positions = range(len(names))
    bars.bar([p - width / 2 for p in positions], [rows[n].ca for n in names], width, label="CA")
    bars.bar([p + width / 2 for p in positions], [rows[n].asr or 0.0 for n in names], width, label="ASR")
    bars.set_xticks(list(positions), names)
    bars.set_ylabel("%")
    bars.set_ylim(0, 100)
    bars.set_title("clean accuracy and attack success rate")
    bars.legend()
    perturbations = sorted({p for evaluation in rows.values() for p in evaluation.pr})
    for name in names:
        lines.plot(perturbations, [rows[name].pr.get(p, float("nan")) for p in perturbations], marker="o", label=name)
    lines.set_title("perturbation resistivity (PR)")
    lines.set_ylabel("PR")
    lines.tick_params(axis="x", rotation=45)
    lines.legend()
    return save_figure(figure, out, dpi=120)


def save_figure(figure, out: str | Path, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return out
