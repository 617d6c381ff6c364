"""vpt: plain visual prompt tuning, RVPT with alpha 0 (no feature repulsion); a baseline
(docs/baselines.md). Its settings are RVPT's but alpha, which it fixes, and margin, which
only matters with alpha."""
from __future__ import annotations

from ..configs import derive
from ..rvpt import EXTENSION_FIELDS, RVPTConfig, train_rvpt
from .base import Defense, TrainContext, Trained
from .rvpt import HELP, SCALED, rvpt_config

VPTSettings = derive(RVPTConfig, "VPTSettings", drop=("seed", "alpha", "margin", *EXTENSION_FIELDS),
                     scaled=SCALED, module=__name__, doc="VPT's settings: RVPT's without alpha and margin")


def train(context: TrainContext, settings) -> Trained:
    config = rvpt_config(context, settings, alpha=0.0)
    prompts, history = train_rvpt(context.encoder, context.text_features, context.logit_scale, context.preprocess,
                                  context.shots, config, context.progress)
    return Trained(context.text_features, context.logit_scale, prompts, history[-1], config.to_dict())


DEFENSE = Defense("vpt", "plain visual prompt tuning (RVPT with alpha 0), a baseline", VPTSettings, train,
                  stages={"rvpt": ""}, help={key: text for key, text in HELP.items() if key not in ("alpha", "margin")},
                  baseline=True)
