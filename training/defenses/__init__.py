"""The defenses: one module each, one registry that training.purify, training.report and
the command-line help read.

    from training import defenses
    defenses.get("rvpt")              # a Defense: name, settings dataclass, train function
    defenses.names()                  # every method, in the report's row order
    defenses.settings_of("cbpt", {"rvpt.lr": 1})   # InputError: rvpt.lr is rvpt+cbpt's

Adding a defense: a module with a `Defense` (training/defenses/base.py says what each
part means) and one entry in BUILT_IN below, or `register(defense)` from outside.
Presets (named recipes: a method and settings) are in training/defenses/presets.py;
the default method is its "default" preset.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from guard.errors import InputError

from . import cleanclip, cbpt, ft, linear_probe, none, rvpt, rvpt_cbpt, unlearn, vpt
from .base import Defense, TrainContext, Trained, check_settings

__all__ = ["Defense", "TrainContext", "Trained", "register", "unregister", "get", "names", "settings_of",
           "owners", "REGISTRY"]

# The report's row order: the undefended model, the baselines, then the papers' methods.
BUILT_IN = (none.DEFENSE, linear_probe.DEFENSE, vpt.DEFENSE, ft.DEFENSE, cleanclip.DEFENSE, rvpt.DEFENSE,
            cbpt.DEFENSE, rvpt_cbpt.DEFENSE, unlearn.DEFENSE)
REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    """Make `defense` a method of purify, the report and the CLI help."""
    if not isinstance(defense, Defense):
        raise TypeError(f"register takes a training.defenses.Defense, got {type(defense).__name__}")
    if defense.name in REGISTRY:
        raise InputError(f"a defense named {defense.name!r} is registered already")
    REGISTRY[defense.name] = defense
    return defense


def unregister(name: str) -> None:
    """Remove a defense registered with `register` (tests, plug-ins)."""
    get(name)
    del REGISTRY[name]


def get(name: str) -> Defense:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}") from None


def names(where: Optional[str] = None) -> tuple[str, ...]:
    """Every method's name; where="report": the report's default rows, "baseline": those
    RVPT is compared against."""
    chosen: Iterable[Defense] = REGISTRY.values()
    if where == "report":
        chosen = (defense for defense in chosen if defense.in_report)
    elif where == "baseline":
        chosen = (defense for defense in chosen if defense.baseline)
    elif where is not None:
        raise ValueError(f"where must be None, 'report' or 'baseline', got {where!r}")
    return tuple(defense.name for defense in chosen)


def owners(key: str) -> list[str]:
    """The methods that have setting `key`."""
    return [defense.name for defense in REGISTRY.values() if key in defense.keys()]


def settings_of(method: str, values: Optional[Mapping] = None):
    """Method's settings dataclass with `values` applied; a key that belongs to another
    method, an unknown key or a value of the wrong type is an InputError saying so."""
    return check_settings(get(method), values, owners)


for _defense in BUILT_IN:
    register(_defense)
