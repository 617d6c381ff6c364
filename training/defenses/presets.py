"""Named recipes: a method and its settings, the ones the docs give.

    python -m training.purify --preset rvpt-strong --model zoo/badnet --out runs/rvpt-strong
    python -m training.purify --preset unlearn-frozen --set lr=0.05 ...   # --set changes one

"default" is the method purify runs when neither --method nor --preset is given: the
one place to switch the default defense. A preset is a plain entry of PRESETS; adding
one is one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from guard.errors import InputError


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    settings: Mapping = field(default_factory=dict)
    summary: str = ""


# The extension's recipes share the refreshed, frozen-target unlearning of docs/reference-benchmark.md.
_FROZEN = {"unlearn_weight": 1.0, "lr": 0.1, "unlearn_refresh": 2, "unlearn_refresh_stop": 0.7,
           "unlearn_targets": "frozen", "distill_weight": 8.0}

PRESETS = {preset.name: preset for preset in (
    Preset("default", "rvpt", {}, "the default defense: RVPT with the paper's settings, scaled to the model"),
    Preset("rvpt-paper", "rvpt", {}, "RVPT with the paper's settings (J, b scaled to the model)"),
    Preset("rvpt-strong", "rvpt", {"lr": 0.5, "alpha": 8.0, "epochs": 100, "num_tokens": 32},
           "much stronger repulsion (docs/results.md): lower ASR, lower CA"),
    Preset("cbpt-paper", "cbpt", {}, "CBPT with the paper's settings"),
    Preset("unlearn", "unlearn", {"unlearn_weight": 1.0, "lr": 0.02},
           "VPT prompts that unlearn the trigger inverted from the shots (docs/reference-benchmark.md)"),
    Preset("unlearn-refresh", "unlearn", {"unlearn_weight": 1.0, "lr": 0.01, "unlearn_refresh": 2},
           "... re-inverting the trigger every 2 epochs"),
    Preset("unlearn-distill", "unlearn", {"unlearn_weight": 2.0, "lr": 0.1, "unlearn_refresh": 2,
                                          "distill_weight": 8.0},
           "... and distilling the frozen model's clean predictions"),
    Preset("unlearn-frozen", "unlearn", _FROZEN,
           "... stamped shots learn the frozen model's predictions, refreshing stops at 0.7 "
           "(the best recipe on the first benchmark)"),
    Preset("unlearn-mixup", "unlearn", {**_FROZEN, "distill_mixup": 4.0},
           "... and distilling on mixed pairs of shots"),
    Preset("unlearn-rvpt", "unlearn", {**_FROZEN, "alpha": 0.5, "unlearn_refresh_stop": 0.6, "distill_mixup": 4.0},
           "the mixup recipe on RVPT prompts (alpha 0.5), refreshing stops at 0.6"),
)}
DEFAULT = "default"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def default_method() -> str:
    return PRESETS[DEFAULT].method


def check_presets() -> None:
    """Every preset names a registered method and only that method's settings."""
    from . import settings_of

    for preset in PRESETS.values():
        settings_of(preset.method, preset.settings)
