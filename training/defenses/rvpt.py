"""rvpt: repulsive visual prompt tuning (training/rvpt.py, arXiv 2412.20392), CLIP frozen.
The artifact stores the learnt visual prompts and the template class embeddings."""
from __future__ import annotations

from ..configs import derive
from ..rvpt import EXTENSION_FIELDS, RVPTConfig, train_rvpt
from .base import Defense, TrainContext, Trained

# start_block and num_tokens default to the paper's setting scaled to the model (RVPTConfig.for_encoder)
SCALED = {"start_block": 0, "num_tokens": 1}
RVPTSettings = derive(RVPTConfig, "RVPTSettings", drop=("seed", *EXTENSION_FIELDS), scaled=SCALED,
                      module=__name__, doc="RVPT's settings: the paper's, prompt size scaled to the model")

HELP = {
    "start_block": "first prompted block J (none: the last 9 blocks, all of a smaller model)",
    "num_tokens": "prompt tokens per block (none: 50 per 49 patches, the paper's ratio)",
    "alpha": "weight of the feature-repelling loss (0 is plain VPT)",
    "margin": "FR margin m in max(cos, m) (-1: full repulsion)",
    "epochs": "training epochs",
    "batch_size": "batch size",
    "lr": "SGD learning rate (cosine decay per step)",
    "momentum": "SGD momentum",
}


def rvpt_config(context: TrainContext, settings, **fixed) -> RVPTConfig:
    """The RVPTConfig of these settings on this model, with the run's seed."""
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    return RVPTConfig.for_encoder(context.encoder, seed=context.seed, **{**values, **fixed})


def train(context: TrainContext, settings) -> Trained:
    config = rvpt_config(context, settings)
    prompts, history = train_rvpt(context.encoder, context.text_features, context.logit_scale, context.preprocess,
                                  context.shots, config, context.progress)
    return Trained(context.text_features, context.logit_scale, prompts, history[-1], config.to_dict())


DEFENSE = Defense("rvpt", "repulsive visual prompts (RVPT), CLIP frozen; docs/methods.md", RVPTSettings, train,
                  stages={"rvpt": ""}, help=HELP)
