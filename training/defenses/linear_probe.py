"""linear-probe: a cosine linear head on the frozen image tower, a baseline
(training/baselines.py). The head is stored as the class embeddings: PromptedCLIP
computes the cosine probe, so every serving path runs it unchanged."""
from __future__ import annotations

from ..baselines import LinearProbeConfig, train_linear_probe
from ..configs import derive
from .base import Defense, TrainContext, Trained

ProbeSettings = derive(LinearProbeConfig, "ProbeSettings", drop=("seed",), module=__name__,
                       doc="the linear probe's settings (docs/methods.md's)")

HELP = {"epochs": "training epochs", "batch_size": "batch size", "lr": "SGD learning rate",
        "momentum": "SGD momentum", "weight_decay": "SGD weight decay",
        "init_std": "std of the head's normal init (none: 1/sqrt(E), rows of norm about 1)"}


def train(context: TrainContext, settings) -> Trained:
    config = LinearProbeConfig(**{name: getattr(settings, name) for name in settings.__dataclass_fields__},
                               seed=context.seed)
    head, history = train_linear_probe(context.encoder, context.logit_scale, context.preprocess, context.shots,
                                       config, context.progress, device=context.text_features.device)
    return Trained(head, context.logit_scale, None, history[-1], {"linear_probe": config.to_dict()})


DEFENSE = Defense("linear-probe", "a cosine linear head on the frozen image tower, a baseline", ProbeSettings,
                  train, stages={"probe": ""}, help=HELP, baseline=True)
