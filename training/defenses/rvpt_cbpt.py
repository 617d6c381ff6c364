"""rvpt+cbpt: RVPT's visual prompts and CBPT's class contexts. schedule joint (the default)
trains both at once (training.cbpt.train_joint); sequential trains RVPT against the
template embeddings, then CBPT on the prompted image tower (docs/cbpt.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

from guard.errors import InputError

from ..cbpt import purified_text_features, train_cbpt, train_joint
from ..rvpt import train_rvpt
from .base import Defense, TrainContext, Trained
from .cbpt import HELP as CBPT_HELP
from .cbpt import CBPTSettings, cbpt_config, text_arguments
from .rvpt import HELP as RVPT_HELP
from .rvpt import RVPTSettings, rvpt_config

SCHEDULES = ("joint", "sequential")


@dataclass(frozen=True)
class RVPTCBPTSettings:
    """Each stage's own settings (rvpt.KEY, cbpt.KEY) and the schedule."""
    schedule: str = "joint"
    rvpt: RVPTSettings = field(default_factory=RVPTSettings)
    cbpt: CBPTSettings = field(default_factory=CBPTSettings)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}")


def train(context: TrainContext, settings: RVPTCBPTSettings) -> Trained:
    rvpt, cbpt = rvpt_config(context, settings.rvpt), cbpt_config(context, settings.cbpt)
    if settings.schedule == "sequential":  # RVPT against the template embeddings, then CBPT on its prompted tower
        prompts, rvpt_history = train_rvpt(context.encoder, context.text_features, context.logit_scale,
                                           context.preprocess, context.shots, rvpt, context.progress)
        contexts, history = train_cbpt(*text_arguments(context, cbpt), visual_prompts=prompts,
                                       progress=context.progress)
        final_epoch = {"rvpt": rvpt_history[-1], "cbpt": history[-1]}
    else:
        contexts, prompts, history = train_joint(*text_arguments(context, cbpt), rvpt, progress=context.progress)
        final_epoch = history[-1]
    return Trained(purified_text_features(context.text_encoder, contexts), context.logit_scale, prompts,
                   final_epoch, {"rvpt": rvpt.to_dict(), "cbpt": cbpt.to_dict(), "schedule": settings.schedule})


DEFENSE = Defense("rvpt+cbpt", "RVPT and CBPT, jointly or one after the other (schedule); docs/cbpt.md",
                  RVPTCBPTSettings, train, stages={"rvpt": "rvpt.", "cbpt": "cbpt."},
                  help={"schedule": "joint (both at once) or sequential (RVPT, then CBPT)",
                        **{f"rvpt.{key}": text for key, text in RVPT_HELP.items()},
                        **{f"cbpt.{key}": text for key, text in CBPT_HELP.items()}})
