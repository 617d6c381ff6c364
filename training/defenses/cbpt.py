"""cbpt: class-wise backdoor prompt tuning (training/cbpt.py, arXiv 2502.19269), CLIP frozen.
The artifact has no visual prompts, only the purified class embeddings."""
from __future__ import annotations


from ..cbpt import CBPTConfig, purified_text_features, train_cbpt
from ..configs import derive
from .base import Defense, TrainContext, Trained

CBPTSettings = derive(CBPTConfig, "CBPTSettings", drop=("seed",), module=__name__,
                      doc="CBPT's settings: the paper's (training/cbpt.py says where it is silent)")

HELP = {
    "num_context": "context tokens per class M",
    "position": "where the class name sits relative to the context: end, middle or front",
    "init_words": "words the context starts from when they tokenise to M tokens (else N(0, 0.02))",
    "epochs": "training epochs",
    "warmup_epochs": "first epochs with L_bn only",
    "batch_size": "batch size",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "bn_weight": "weight of L_bn",
    "adv_weight": "weight of L_adv",
    "align_weight": "weight of L_align",
    "trigger_weight": "a in L_bn",
    "logit_scale": "softmax scale in p(v; i) (none: the model's own)",
    "positive": "positive sample of the trigger inversion: farthest, closest or random",
    "rho": "l2 radius of the inverted trigger on [0, 1] pixels (6/255)",
    "inversion_steps": "SGD steps of the trigger inversion",
    "inversion_lr": "learning rate of the trigger inversion",
}


def cbpt_config(context: TrainContext, settings) -> CBPTConfig:
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    return CBPTConfig(**values, seed=context.seed)


def text_arguments(context: TrainContext, config: CBPTConfig) -> tuple:
    """train_cbpt's and train_joint's leading arguments."""
    return (context.encoder, context.text_encoder, context.tokenizer, context.classes, context.logit_scale,
            context.preprocess, context.shots, config)


def train(context: TrainContext, settings) -> Trained:
    config = cbpt_config(context, settings)
    contexts, history = train_cbpt(*text_arguments(context, config), progress=context.progress)
    return Trained(purified_text_features(context.text_encoder, contexts), context.logit_scale, None, history[-1],
                   {"cbpt": config.to_dict()})


DEFENSE = Defense("cbpt", "class-wise text prompts (CBPT), CLIP frozen; docs/cbpt.md", CBPTSettings, train,
                  stages={"cbpt": ""}, help=HELP)
