"""ft: contrastive fine-tuning of both towers on the shots, a baseline (training/baselines.py,
docs/baselines.md). Both towers change in place: the classes are embedded again and the
logit scale is read again after training."""
from __future__ import annotations

from ..baselines import FinetuneConfig, finetune
from ..configs import derive
from ..text import class_text_features
from .base import Defense, TrainContext, Trained

FTSettings = derive(FinetuneConfig, "FTSettings", drop=("seed", "self_supervised_weight"), module=__name__,
                    doc="FT's settings (CleanCLIP's lr and epochs)")

HELP = {"epochs": "fine-tuning epochs", "batch_size": "batch size", "lr": "AdamW learning rate",
        "weight_decay": "AdamW weight decay", "warmup_fraction": "fraction of the steps of linear warm-up",
        "min_crop_scale": "CleanCLIP's augmentations: smallest crop area",
        "flip": "CleanCLIP's augmentations: horizontal flips", "jitter": "CleanCLIP's augmentations: "
        "brightness and contrast jitter"}


def finetuned(context: TrainContext, settings, self_supervised_weight: float) -> Trained:
    """Fine-tune with this weight of CleanCLIP's in-modality losses (0: FT)."""
    config = FinetuneConfig(**{name: getattr(settings, name) for name in settings.__dataclass_fields__
                               if name != "self_supervised_weight"},
                            self_supervised_weight=self_supervised_weight, seed=context.seed)
    history = finetune(context.clip, context.tokenizer, context.preprocess, context.shots, config, context.progress)
    text_features = class_text_features(context.text_encoder, context.tokenizer, context.classes, context.templates)
    return Trained(text_features, context.clip.logit_scale.exp().item(), None, history[-1],
                   {"finetune": config.to_dict()})


def train(context: TrainContext, settings) -> Trained:
    return finetuned(context, settings, 0.0)


DEFENSE = Defense("ft", "contrastive fine-tuning of both towers, a baseline", FTSettings, train,
                  stages={"ft": ""}, help={key: text for key, text in HELP.items()
                                           if key not in ("min_crop_scale", "flip", "jitter")}, baseline=True)
