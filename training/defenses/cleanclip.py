"""cleanclip: FT plus CleanCLIP's in-modality self-supervised losses (arXiv 2303.03323), a
baseline (training/baselines.py)."""
from __future__ import annotations

from ..baselines import FinetuneConfig
from ..configs import derive
from .base import Defense, TrainContext, Trained
from .ft import HELP, finetuned

CleanCLIPSettings = derive(FinetuneConfig, "CleanCLIPSettings", drop=("seed",),
                           defaults={"self_supervised_weight": 1.0}, module=__name__,
                           doc="FT's settings and the weight of the self-supervised losses (the paper's 1)")


def train(context: TrainContext, settings) -> Trained:
    return finetuned(context, settings, settings.self_supervised_weight)


DEFENSE = Defense("cleanclip", "FT plus in-modality self-supervised losses (CleanCLIP), a baseline",
                  CleanCLIPSettings, train, stages={"ft": ""},
                  help={**HELP, "self_supervised_weight": "weight of the image-image and text-text losses"},
                  baseline=True)
