"""Settings dataclasses of the training methods: one way to apply overrides to them, to
parse `--set KEY=VALUE` and config files, and to check every value's type."""
from __future__ import annotations

import json
from dataclasses import MISSING, fields, is_dataclass, make_dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from types import UnionType
from typing import Callable, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from guard.errors import InputError

try:  # Python 3.11 on; on 3.10 config files are JSON only
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None


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


# --------------------------------------------------------------------------- settings from text

def parse_assignments(items: Sequence[str], form: str = "KEY=VALUE (e.g. lr=0.5)") -> dict:
    """`--set` items as {KEY: VALUE}, later items winning. VALUE is JSON (a number, true,
    null, a list) or else a string, so `lr=0.5` is a float and `position=end` a string.
    The one parser of training.purify's and training.report's --set."""
    values: dict = {}
    for item in items:
        key, equals, raw = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise InputError(f"--set takes {form}, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def load_config_file(path: Path) -> dict:
    """A JSON (.json) or TOML (.toml) file's table; what it may hold is the caller's to check."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise InputError(f"cannot read config file {path}: {error.strerror or error}") from None
    toml = Path(path).suffix == ".toml"
    if toml and tomllib is None:
        raise InputError(f"config file {path}: TOML needs Python 3.11 or later; write it as JSON")
    try:
        loaded = tomllib.loads(text) if toml else json.loads(text)
    except (ValueError, json.JSONDecodeError) as error:  # tomllib.TOMLDecodeError is a ValueError
        raise InputError(f"config file {path} is not valid {'TOML' if Path(path).suffix == '.toml' else 'JSON'}: "
                         f"{error}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path} must hold a table (a JSON object), got {type(loaded).__name__}")
    return loaded


def flatten(values: Mapping, prefix: str = "") -> dict:
    """{"rvpt": {"lr": 1}} as {"rvpt.lr": 1}: a config file's nested tables as --set keys."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------- typed settings dataclasses

def settings_fields(cls) -> dict:
    """{name: (type, default)} of a settings dataclass, types resolved; a nested settings
    dataclass has its class as type."""
    hints = get_type_hints(cls)
    return {item.name: (hints[item.name],
                        item.default if item.default is not MISSING else item.default_factory())
            for item in fields(cls)}


def setting_keys(cls, prefix: str = "") -> list[str]:
    """Every KEY of `cls` that --set accepts, nested ones as PART.KEY."""
    keys = []
    for name, (kind, _) in settings_fields(cls).items():
        keys += setting_keys(kind, f"{prefix}{name}.") if is_dataclass(kind) else [f"{prefix}{name}"]
    return keys


def build_settings(cls, values: Mapping, what: str, unknown_advice: Optional[Callable[[str], str]] = None):
    """`cls`'s defaults with `values` ({KEY or PART.KEY: value}, nested mappings allowed)
    applied. Unknown keys and values of the wrong type are InputErrors; an int is taken
    for a float (8 means 8.0). `unknown_advice(key)` says where an unknown key belongs."""
    nested: dict[str, dict] = {}
    chosen = {}
    known = settings_fields(cls)
    for key, value in flatten(values).items():
        name, dot, rest = key.partition(".")
        kind = known.get(name, (None, None))[0]
        if kind is None or bool(dot) != is_dataclass(kind):
            advice = unknown_advice(key) if unknown_advice else ""
            raise InputError(f"{key!r} is not a setting of {what}; "
                             + (advice or f"its settings: {', '.join(setting_keys(cls))}"))
        if dot:
            nested.setdefault(name, {})[rest] = value
        else:
            chosen[name] = _typed(value, kind, f"{what} setting {key!r}")
    for name, part in nested.items():
        chosen[name] = build_settings(known[name][0], part, f"{what}'s {name}", unknown_advice=None)
    return cls(**chosen)


def type_name(kind) -> str:
    """int, float, str, bool, 'float or null', 'list of str' ..."""
    if get_origin(kind) in (Union, UnionType):
        return " or ".join("null" if arg is type(None) else type_name(arg) for arg in get_args(kind))
    if get_origin(kind) is tuple:
        return f"list of {type_name(get_args(kind)[0])}"
    return getattr(kind, "__name__", str(kind))


def _typed(value, kind, what: str):
    """`value` as a `kind` (no conversion but int to float and list to tuple), or an InputError."""
    if get_origin(kind) in (Union, UnionType):
        for arg in get_args(kind):
            if arg is type(None) and value is None:
                return None
            try:
                return _typed(value, arg, what)
            except InputError:
                continue
    elif get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(item, get_args(kind)[0], what) for item in value)
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise InputError(f"{what} must be {type_name(kind)}, got {value!r}")


def derive(source, name: str, *, drop: Sequence[str] = (), defaults: Optional[Mapping] = None,
           scaled: Optional[Mapping] = None, doc: str = "", module: Optional[str] = None):
    """A frozen settings dataclass `name` with `source`'s fields but `drop` (what purify
    sets itself, such as the seed, or what the method fixes), `defaults` changed, and each
    field of `scaled` Optional (None: the method scales it to the model). Its values are
    checked by building a `source` from them (a scaled None checked as `scaled[field]`),
    so a bad value fails before any model loads. Defaults come from `source`, so the two
    never drift apart. `module`: where the caller binds it (for repr and pickling)."""
    defaults, scaled = dict(defaults or {}), dict(scaled or {})
    specs = []
    for field_name, (kind, default) in settings_fields_of_source(source).items():
        if field_name in drop:
            continue
        if field_name in scaled:
            specs.append((field_name, Optional[kind], dataclass_field(default=None)))
        else:
            specs.append((field_name, kind, dataclass_field(default=defaults.pop(field_name, default))))
    if defaults:
        raise TypeError(f"derive: {sorted(defaults)} are not fields of {source.__name__}")

    def __post_init__(self):
        values = {item: getattr(self, item) for item, _, _ in specs}
        source(**{**values, **{item: stand_in for item, stand_in in scaled.items() if values[item] is None}})

    cls = make_dataclass(name, specs, frozen=True, namespace={"__post_init__": __post_init__,
                                                               "__doc__": doc or f"{source.__name__}'s settings"})
    cls.__module__ = module or source.__module__
    return cls


def settings_fields_of_source(source) -> dict:
    """settings_fields, a field without a default (RVPTConfig's scaled ones) as default None."""
    hints = get_type_hints(source)
    return {item.name: (hints[item.name], item.default if item.default is not MISSING
                        else None if item.default_factory is MISSING else item.default_factory())
            for item in fields(source)}
