"""none: no defense. The artifact is the unchanged model (template class embeddings, no
prompts); its "after" is the evaluation before, made once."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Defense, TrainContext, Trained


@dataclass(frozen=True)
class NoSettings:
    """No defense has no settings."""


def train(context: TrainContext, settings: NoSettings) -> Trained:
    return Trained(context.text_features, context.logit_scale, unchanged=True)


DEFENSE = Defense("none", "no defense: the model as it is (the report's undefended row)", NoSettings, train,
                  baseline=True)
