"""The one interface every defense implements (training/defenses/__init__.py lists them).

A defense is a name, a frozen settings dataclass (its fields are the method's settings,
with defaults) and a train function that turns a TrainContext (the loaded model, the
template class embeddings and the few-shot set) and those settings into a Trained: what
the artifact stores (class embeddings, logit scale, visual prompts) and records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder, VisualPrompts

from ..configs import build_settings, settings_fields, setting_keys, type_name
from ..data import ImageDataset
from ..text import TextEncoder


@dataclass(frozen=True)
class TrainContext:
    """What a defense trains on. `clip` is the whole open_clip model (ft changes it in
    place); `text_features` are the template class embeddings the model had before."""
    clip: torch.nn.Module
    tokenizer: Callable
    encoder: PromptedVisionEncoder
    text_encoder: TextEncoder
    classes: Sequence[str]
    templates: Sequence[str]
    text_features: torch.Tensor
    logit_scale: float
    preprocess: Preprocess
    shots: ImageDataset
    seed: int
    progress: bool = False


@dataclass(frozen=True)
class Trained:
    """What a defense hands to the artifact: the class embeddings and logit scale to serve,
    the visual prompts (None: none), the last epoch's losses, the settings to record as the
    manifest's hyperparameters, and findings to add to the metrics (the trigger inversion's).
    `unchanged`: the model is the one evaluated before, so "after" is "before"."""
    text_features: torch.Tensor
    logit_scale: float
    prompts: Optional[VisualPrompts] = None
    final_epoch: Any = None
    recorded: dict = field(default_factory=dict)
    inversion: Optional[dict] = None
    unchanged: bool = False


@dataclass(frozen=True)
class Defense:
    """One purification method.

    name       what --method, the report's --defenses and the artifact's manifest call it
    summary    one line for --help
    settings   frozen dataclass of its settings, every field with a default
    train      train(context, settings) -> Trained
    stages     the report's --set STAGE.OPTION: {stage: prefix of its keys in `settings`}
    help       {setting: one line} for --help-method
    baseline   a row the report compares RVPT against
    in_report  a row of the report's default --defenses
    """
    name: str
    summary: str
    settings: type
    train: Callable[[TrainContext, Any], Trained]
    stages: Mapping[str, str] = field(default_factory=dict)
    help: Mapping[str, str] = field(default_factory=dict)
    baseline: bool = False
    in_report: bool = True

    def keys(self) -> list[str]:
        """Every setting --set accepts for this defense."""
        return setting_keys(self.settings)

    def describe(self) -> str:
        """--help-method's text, generated from the settings dataclass."""
        lines = [f"{self.name}: {self.summary}", ""]
        keys = self.keys()
        if not keys:
            return "\n".join(lines + ["no settings"])
        lines.append("settings (--set KEY=VALUE, or the [settings] table of --config), default in brackets:")
        width = max(map(len, keys))
        for key in keys:
            kind, default = _field(self.settings, key)
            lines.append(f"  {key:<{width}}  {type_name(kind)} [{_format(default)}]"
                         + (f"  {self.help[key]}" if key in self.help else ""))
        return "\n".join(lines)


def _field(cls, key: str):
    name, _, rest = key.partition(".")
    kind, default = settings_fields(cls)[name]
    return _field(kind, rest) if rest else (kind, default)


def _format(value) -> str:
    return "none" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def check_settings(defense: Defense, values, owners: Callable[[str], list[str]]):
    """`values` (a mapping of --set keys, or already a `defense.settings`) as the defense's
    settings; a key of another method's says which method has it."""
    if isinstance(values, defense.settings):
        return values
    if values is not None and not isinstance(values, Mapping):
        raise InputError(f"settings of {defense.name} must be a mapping of setting names to values or a "
                         f"{defense.settings.__name__}, got {type(values).__name__}")

    def advice(key: str) -> str:
        if key == "seed":
            return "the seed is one for the whole run: --seed (purify's seed=)"
        own = [name for name in defense.keys() if name.endswith(f".{key}")]
        if own:  # rvpt+cbpt's stages have settings of the same name
            return f"did you mean {' or '.join(own)}?"
        elsewhere = owners(key)
        if elsewhere:
            return (f"it is a setting of {', '.join(elsewhere)}: use "
                    + (f"--method {elsewhere[0]}" if len(elsewhere) == 1 else "one of those methods")
                    + " (or a preset of it)")
        return (f"its settings: {', '.join(defense.keys()) or 'none'} "
                f"(python -m training.purify --help-method {defense.name})")

    return build_settings(defense.settings, values or {}, defense.name, advice)
