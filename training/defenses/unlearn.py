"""unlearn: the extension outside both papers (docs/reference-benchmark.md). Visual prompts
(VPT by default, alpha > 0 makes them RVPT's) that also unlearn a trigger inverted from
the shots themselves (training/inversion.py, Neural Cleanse): first a trigger is inverted
for every class and the suspected target's is stamped on the shots, whose CE (or, with
unlearn_targets frozen, the frozen model's predictions on the clean shots) joins the loss;
unlearn_refresh re-inverts it through the prompts during training; distill_weight and
distill_mixup distil the frozen model's clean predictions, which keeps clean accuracy.
The inversion's findings go to the metrics and the JSON."""
from __future__ import annotations

import logging

from ..configs import derive
from ..inversion import invert_triggers
from ..rvpt import RVPTConfig, train_rvpt
from .base import Defense, TrainContext, Trained
from .rvpt import HELP as RVPT_HELP
from .rvpt import SCALED, rvpt_config

log = logging.getLogger(__name__)

UnlearnSettings = derive(RVPTConfig, "UnlearnSettings", drop=("seed",), scaled=SCALED,
                         defaults={"alpha": 0.0, "unlearn_weight": 1.0}, module=__name__,
                         doc="RVPT's settings (alpha 0: VPT) and the extension's")

HELP = {**RVPT_HELP,
        "alpha": "weight of the feature-repelling loss (0: VPT prompts)",
        "unlearn_weight": "weight of unlearning the trigger inverted from the shots (0: plain RVPT/VPT)",
        "unlearn_steps": "steps of that trigger inversion",
        "unlearn_mask_weight": "L1 weight of the inverted mask",
        "unlearn_refresh": "re-invert the trigger through the prompts every this many epochs and unlearn "
                           "every trigger found (0: never)",
        "unlearn_refresh_steps": "inversion steps per refresh",
        "unlearn_refresh_stop": "stop refreshing once the refined mask's L1 exceeds this x the median over "
                                "all classes of the first inversion",
        "unlearn_targets": "what the stamped shots learn: their labels, or the frozen model's predictions "
                           "on the clean shots (frozen)",
        "distill_weight": "weight of distilling the frozen model's predictions on the clean shots (0: off)",
        "distill_temperature": "temperature of that distillation",
        "distill_mixup": "weight of distilling the frozen model's predictions on mixed pairs of clean shots "
                         "(0: off)"}


def train(context: TrainContext, settings) -> Trained:
    config = rvpt_config(context, settings)
    inversion = None
    if config.unlearn_weight:
        inversion = invert_triggers(context.encoder, context.text_features, context.logit_scale,
                                    context.preprocess, context.shots, config.unlearn_steps,
                                    config.unlearn_mask_weight, context.seed, context.progress)
        log.info("trigger inversion suspects %r (anomaly index %.2f)", context.classes[inversion.suspected],
                 inversion.anomaly_index[inversion.suspected])
    prompts, history = train_rvpt(context.encoder, context.text_features, context.logit_scale, context.preprocess,
                                  context.shots, config, context.progress, inversion)
    return Trained(context.text_features, context.logit_scale, prompts, history[-1], config.to_dict(),
                   inversion=None if inversion is None else inversion.to_dict(context.classes))


DEFENSE = Defense("unlearn", "extension: prompts that unlearn a trigger inverted from the shots and distil the "
                  "frozen model (docs/reference-benchmark.md)", UnlearnSettings, train,
                  stages={"rvpt": ""}, help=HELP, in_report=False)
