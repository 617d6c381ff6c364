"""Settings dataclasses of the training methods: one way to apply overrides to them."""
from __future__ import annotations

from dataclasses import fields

from guard.errors import InputError


def check_known(cls, what: str, names) -> None:
    """An InputError naming every setting of `names` that `cls` does not have."""
    known = {field.name for field in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InputError(f"unknown {what} settings {unknown}; known: {sorted(known)}")


def with_overrides(cls, what: str, overrides: dict):
    """cls's defaults with every override that is not None (None means "the default")."""
    check_known(cls, what, overrides)
    return cls(**{name: value for name, value in overrides.items() if value is not None})
