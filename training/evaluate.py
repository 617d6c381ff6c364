"""Clean accuracy (CA), attack success rate (ASR) and perturbation resistivity (PR).

    python -m training.evaluate --model M --data DATA [--attack BACKDOORED_DIR] [--reference CLEAN] [--json OUT]
    python -m training.evaluate --model M --trigger mypkg.triggers:stamp --target t-shirt

M is a purified artifact directory or any CLIP that `training.models.load_clip` reads
(then classes are embedded with --template). The trigger and target recorded with
a backdoored model (trigger.json) are re-applied, so no further flags are needed;
a trigger of your own (--trigger or --trigger-image) needs --target. --reference names
a never-poisoned CLIP: its ASR with the same trigger on the same images is the floor,
and excess ASR = ASR - floor is what the backdoor adds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from guard import console
from guard.artifact import MANIFEST, load_artifact, read_manifest
from guard.errors import InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedCLIP, PromptedVisionEncoder
from .text import DEFAULT_TEMPLATES, TextEncoder, class_text_features

from .attacks import Backdoor, add_trigger_arguments, custom_trigger, load_trigger, resolve_class
from .data import DATA_HELP, ImageDataset, load_dataset
from .perturbations import standard_perturbations

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Evaluation:
    """ca, asr, asr_all in percent. asr counts triggered images whose true class is not
    the target (BackdoorBench); asr_all counts every triggered image (CleanCLIP, BadCLIP).
    pr maps perturbation name -> PR (>0; higher means features move no more than decisions).
    ca_per_class maps class name -> accuracy on that class's test images (percent): where a
    defense loses its clean accuracy. asr_untriggered is asr's count on the same images without
    the trigger: how often the model calls a non-target image the target anyway, the level asr
    cannot be told apart from (a never-poisoned model scores about this much, more where the
    trigger itself damages the image; docs/reference-benchmark.md). floor is a never-poisoned
    reference model's asr with the same trigger on the same images, and excess_asr = asr -
    floor: the part of asr that the backdoor adds (both None without a reference)."""
    ca: float
    asr: Optional[float]
    asr_all: Optional[float]
    pr: dict = field(default_factory=dict)
    num_images: int = 0
    num_pr_images: int = 0
    target: Optional[int] = None
    target_name: Optional[str] = None
    ca_per_class: dict = field(default_factory=dict)
    asr_untriggered: Optional[float] = None
    floor: Optional[float] = None
    excess_asr: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def model_outputs(model: PromptedCLIP, preprocess: Preprocess, images: torch.Tensor,
                  transform: Optional[Transform] = None, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and image embeddings [N, E] of uint8 images, optionally transformed
    (trigger or perturbation) at model resolution before normalisation."""
    model.eval()
    logits, embeddings = [], []
    device = model.text_features.device
    for start in range(0, len(images), batch_size):
        batch = preprocess.resize(images[start:start + batch_size]).to(device)
        if transform is not None:
            batch = transform(batch)
        batch_logits, batch_embeddings = model(preprocess.normalize(batch))
        logits.append(batch_logits.cpu())
        embeddings.append(batch_embeddings.float().cpu())
    return torch.cat(logits), torch.cat(embeddings)


def attack_success_rates(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> tuple[float, float]:
    """(ASR over images whose true class is not the target, ASR over all images), percent."""
    hits = predictions == target
    others = labels != target
    if not others.any():
        raise InputError("every test image belongs to the target class: ASR is undefined")
    return 100.0 * hits[others].float().mean().item(), 100.0 * hits.float().mean().item()


def perturbation_resistivity(clean: tuple[torch.Tensor, torch.Tensor],
                             perturbed: tuple[torch.Tensor, torch.Tensor]) -> float:
    """PR = E[cos(h, h~)] / E[cos(z, z~)] with h image embeddings and z logits."""
    (clean_logits, clean_features), (logits, features) = clean, perturbed
    feature_similarity = F.cosine_similarity(clean_features, features, dim=-1).mean()
    logit_similarity = F.cosine_similarity(clean_logits, logits, dim=-1).mean()
    return (feature_similarity / logit_similarity).item()


def evaluate(model: PromptedCLIP, preprocess: Preprocess, dataset: ImageDataset,
             backdoor: Optional[Backdoor] = None, pr_images: int = 2000, seed: int = 0,
             progress: bool = False, reference: Optional[PromptedCLIP] = None) -> Evaluation:
    """CA on the whole set; ASR with the backdoor's trigger (and, with a never-poisoned
    `reference` model of the same preprocessing, its floor and the excess); PR on a seeded
    subset of `pr_images` images for every standard perturbation."""
    logits, _ = model_outputs(model, preprocess, dataset.images)
    correct = logits.argmax(1) == dataset.labels
    ca = 100.0 * correct.float().mean().item()
    ca_per_class = {name: 100.0 * correct[dataset.labels == index].float().mean().item()
                    for index, name in enumerate(dataset.classes) if (dataset.labels == index).any()}
    asr = asr_all = asr_untriggered = None
    if backdoor is not None:
        triggered, _ = model_outputs(model, preprocess, dataset.images, backdoor.trigger)
        asr, asr_all = attack_success_rates(triggered.argmax(1), dataset.labels, backdoor.target)
        asr_untriggered, _ = attack_success_rates(logits.argmax(1), dataset.labels, backdoor.target)
    floor = excess = None
    if backdoor is not None and reference is not None:
        floor = trigger_floor(reference, preprocess, dataset, backdoor)
        excess = asr - floor
    pr = {}
    pr_count = min(max(pr_images, 0), len(dataset))
    if pr_count:
        subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:pr_count]
        images = dataset.images[subset]
        clean = model_outputs(model, preprocess, images)
        perturbations = standard_perturbations(preprocess.image_size, seed)
        for name, perturb in console.progress(perturbations.items(), desc="PR", enabled=progress):
            pr[name] = perturbation_resistivity(clean, model_outputs(model, preprocess, images, perturb))
    return Evaluation(ca, asr, asr_all, pr, len(dataset), pr_count,
                      None if backdoor is None else backdoor.target,
                      None if backdoor is None else backdoor.target_name, ca_per_class, asr_untriggered, floor, excess)


def trigger_floor(reference: PromptedCLIP, preprocess: Preprocess, dataset: ImageDataset, backdoor: Backdoor) -> float:
    """A never-poisoned model's ASR (percent, non-target images) with the backdoor's trigger."""
    triggered, _ = model_outputs(reference, preprocess, dataset.images, backdoor.trigger)
    return attack_success_rates(triggered.argmax(1), dataset.labels, backdoor.target)[0]


def zero_shot_classifier(loaded, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         prompts=None) -> PromptedCLIP:
    """A PromptedCLIP over a loaded CLIP (`training.models.LoadedCLIP`) and template class embeddings."""
    encoder = PromptedVisionEncoder(loaded.model.visual)
    text_features = class_text_features(TextEncoder(loaded.model), loaded.tokenizer, classes, templates)
    return PromptedCLIP(encoder, text_features, loaded.model.logit_scale.exp().item(), prompts).eval()


def load_classifier(spec: str, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                    device: str = "cpu") -> tuple[PromptedCLIP, Preprocess]:
    """A purified artifact directory, or a CLIP spec embedded zero-shot with `templates`."""
    from .models import load_clip
    from guard.runtime import build_classifier

    if (Path(spec) / MANIFEST).is_file():
        artifact = load_artifact(spec)
        if tuple(artifact.classes) != tuple(classes):
            raise InputError(f"{spec} was purified for classes {list(artifact.classes)}, "
                             f"but the data has {list(classes)}")
        return build_classifier(artifact, device), artifact.preprocess
    loaded = load_clip(spec, device=device)
    return zero_shot_classifier(loaded, classes, templates), loaded.preprocess


def format_summary(rows: dict[str, Evaluation]) -> str:
    """A plain-text table: one row per model, CA / ASR / floor / excess ASR / ASR-all / ASR without the trigger /
    mean PR and each PR ("-" where not measured)."""
    names = sorted({name for evaluation in rows.values() for name in evaluation.pr})
    widths = [max(8, len(name) + 2) for name in names]
    header = (f"{'model':<22}{'CA %':>8}{'ASR %':>8}{'floor %':>9}{'excess':>8}{'ASR-all %':>11}{'untriggered %':>15}"
              f"{'PR mean':>9}"
              + "".join(f"{name:>{width}}" for name, width in zip(names, widths)))
    lines = [header, "-" * len(header)]
    for label, evaluation in rows.items():
        asr, floor, excess, asr_all, untriggered = (_percent(value) for value in (
            evaluation.asr, evaluation.floor, evaluation.excess_asr, evaluation.asr_all, evaluation.asr_untriggered))
        mean_pr = f"{sum(evaluation.pr.values()) / len(evaluation.pr):.3f}" if evaluation.pr else "-"
        lines.append(f"{label:<22}{evaluation.ca:>8.2f}{asr:>8}{floor:>9}{excess:>8}{asr_all:>11}{untriggered:>15}"
                     f"{mean_pr:>9}"
                     + "".join(f"{_pr(evaluation.pr, name):>{width}}" for name, width in zip(names, widths)))
    return "\n".join(lines)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pr(pr: dict, name: str) -> str:
    return f"{pr[name]:.3f}" if name in pr else "-"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns its exit code (guard.console's table: 2 bad input, 3 unusable model)."""
    return console.run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     epilog=console.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="purified artifact directory or CLIP spec")
    parser.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    parser.add_argument("--attack", help="backdoored model directory whose recorded trigger and target to apply")
    parser.add_argument("--target", help="target class (name or index) of a trigger given with --trigger*")
    parser.add_argument("--reference", help="never-poisoned CLIP (spec) whose ASR with the same trigger is the floor")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--template", action="append", help="class prompt template for plain CLIPs (repeatable)")
    parser.add_argument("--pr-images", type=int, default=2000, help="test images used for PR (0 skips PR)")
    parser.add_argument("--image-size", type=int, help="image side for ImageFolder data (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    add_trigger_arguments(parser)
    args = parser.parse_args(argv)
    console.setup_logging()
    dataset = load_dataset(args.data, "test", image_size=args.image_size or _model_image_size(args.model))
    model, preprocess = load_classifier(args.model, dataset.classes, tuple(args.template or DEFAULT_TEMPLATES))
    backdoor = _backdoor(args, dataset.classes, preprocess.image_size)
    reference = None
    if args.reference:
        if backdoor is None:
            raise InputError("--reference measures the floor of a trigger: give --attack DIR or a trigger too")
        reference, reference_preprocess = load_classifier(args.reference, dataset.classes,
                                                          tuple(args.template or DEFAULT_TEMPLATES))
        if reference_preprocess != preprocess:
            raise InputError(f"--reference {args.reference} preprocesses images differently from --model")
    result = evaluate(model, preprocess, dataset, backdoor, args.pr_images, args.seed,
                      progress=not args.no_progress, reference=reference)
    print(format_summary({Path(args.model).name or args.model: result}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _backdoor(args, classes: Sequence[str], image_size: int) -> Optional[Backdoor]:
    """The trigger recorded with --attack DIR, or one given directly with its --target."""
    trigger = custom_trigger(args, image_size)
    if trigger is not None and args.attack:
        raise InputError("give either --attack BACKDOORED_DIR or a trigger of your own, not both")
    if trigger is not None:
        if args.target is None:
            raise InputError("a trigger given with --trigger or --trigger-image needs --target CLASS")
        target = resolve_class(classes, args.target)
        return Backdoor(trigger, target, classes[target])
    if args.target is not None:
        raise InputError("--target goes with --trigger or --trigger-image; --attack DIR records its own target")
    return load_trigger(Path(args.attack)) if args.attack else None


def _model_image_size(spec: str) -> Optional[int]:
    """An artifact's input side (for ImageFolder data); plain CLIPs need --image-size."""
    if (Path(spec) / MANIFEST).is_file():
        return read_manifest(spec)["preprocess"]["image_size"]
    return None


if __name__ == "__main__":
    sys.exit(main())
