"""Serving a purified model: `load` an artifact, then `Guard.classify` images.

    with guard.load("artifacts/purified") as model:
        result = model.classify("photo.jpg")
        print(result.label, result.to_dict())

Only the image tower is rebuilt; the class text embeddings come precomputed in the
artifact, so no text tower, tokenizer or base checkpoint is needed at serving time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._compat import import_open_clip
from .artifact import Artifact, load_artifact
from .errors import ArtifactError, ClosedError, InputError
from .inputs import prepare_batch, to_tensor
from .preprocess import Preprocess
from .prompted import PromptedCLIP, PromptedVisionEncoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch")


def build_classifier(artifact: Artifact, device=None) -> PromptedCLIP:
    """The artifact's prompted image tower and class embeddings as a frozen PromptedCLIP."""
    # Building modules draws random initial weights, all overwritten from the artifact;
    # fork_rng keeps loading a model from moving the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        return _build_classifier(artifact, device)


def _build_classifier(artifact: Artifact, device) -> PromptedCLIP:
    open_clip = import_open_clip()
    try:
        cfg = artifact.model_cfg
        # model_cfg records the activation; the base model identity is the fallback.
        quick_gelu = bool(cfg.get("quick_gelu", artifact.manifest["base_model"].get("quick_gelu", False)))
        # A private open_clip function, but the one CLIP.__init__ itself uses to build the image
        # tower alone: building the whole CLIP would allocate a text tower serving never runs.
        visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"the model_cfg of {artifact.path} does not build an open_clip image tower "
                            f"({error!r})") from error
    try:
        visual.load_state_dict(artifact.vision_state, strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"the image tower weights of {artifact.path} do not fit its model_cfg: {error}") from error
    encoder = PromptedVisionEncoder(visual.float().eval())

    prompts = None
    if artifact.visual_prompts is not None:
        prompts = _load_prompts(artifact, encoder)

    embed_dim = int(cfg["embed_dim"])
    text_features = artifact.text_features
    if tuple(text_features.shape) != (len(artifact.classes), embed_dim):
        raise ArtifactError(f"{artifact.path} has class embeddings of shape {tuple(text_features.shape)}; "
                            f"expected ({len(artifact.classes)} classes, {embed_dim})")
    model = PromptedCLIP(encoder, text_features, artifact.logit_scale, prompts)
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def _load_prompts(artifact: Artifact, encoder: PromptedVisionEncoder):
    saved = artifact.visual_prompts
    if saved.ndim != 3:
        raise ArtifactError(f"the visual prompts of {artifact.path} have shape {tuple(saved.shape)}; "
                            "expected [blocks, tokens, width]")
    try:
        prompts = encoder.new_prompts(artifact.prompt_start_block, saved.shape[1])
    except InputError as error:
        raise ArtifactError(f"the visual prompts of {artifact.path} do not fit its image tower: {error}") from error
    if saved.shape != prompts.tokens.shape:
        raise ArtifactError(f"the visual prompts of {artifact.path} have shape {tuple(saved.shape)}; its image "
                            f"tower from block {artifact.prompt_start_block} on needs {tuple(prompts.tokens.shape)}")
    with torch.no_grad():
        prompts.tokens.copy_(saved)
    return prompts


@dataclass(frozen=True)
class Classification:
    """The prediction for one image. probs: softmax of the logits, in class order."""
    label: str
    index: int
    probs: tuple[float, ...] = field(repr=False)
    classes: tuple[str, ...] = field(repr=False)

    @property
    def score(self) -> float:
        return self.probs[self.index]

    def top_k(self, k: int) -> list[tuple[str, float]]:
        """The k most probable (class, probability) pairs, most probable first."""
        ranked = sorted(zip(self.classes, self.probs), key=lambda pair: pair[1], reverse=True)
        return ranked[:k]

    def to_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "probs": dict(zip(self.classes, self.probs))}


class Guard:
    """A loaded purified classifier. Thread-safe: classify keeps no state between calls
    and the model is only read, under torch.inference_mode."""

    def __init__(self, model: PromptedCLIP, preprocess: Preprocess, classes: Sequence[str],
                 manifest: dict, device: torch.device, backend: str = "torch"):
        self._model: Optional[PromptedCLIP] = model
        self.preprocess = preprocess
        self.classes = tuple(classes)
        self.manifest = manifest
        self.device = device
        self.backend = backend

    def __repr__(self) -> str:
        state = "closed" if self._model is None else f"{len(self.classes)} classes"
        return f"Guard({state}, backend={self.backend!r}, device={str(self.device)!r})"

    def classify(self, inputs, batch_size: int = 64):
        """One image -> Classification; a list or tuple of images -> list of Classification.

        An image is a PIL image, a file path, an HxW(x1|x3) numpy array or a CHW tensor
        (see guard.inputs). Lists run through the model batch_size images at a time."""
        single = not isinstance(inputs, (list, tuple))
        logits = self.logits(inputs, batch_size)
        results = [Classification(self.classes[index], index, tuple(probs), self.classes)
                   for index, probs in zip(logits.argmax(dim=-1).tolist(), logits.softmax(dim=-1).tolist())]
        return results[0] if single else results

    def logits(self, inputs, batch_size: int = 64) -> torch.Tensor:
        """[N, C] float32 logits on the CPU; N = 1 for a single image."""
        model = self._open_model()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(inputs, (list, tuple)):
            items = list(inputs)
        else:
            items = [to_tensor(inputs)]  # checked here so its error names no list index
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                images = prepare_batch(items[start:start + batch_size], self.preprocess, self.device, start)
                logits, _ = model(images)
                chunks.append(logits.float().cpu())
        if not chunks:
            return torch.empty(0, len(self.classes))
        return torch.cat(chunks)

    def close(self) -> None:
        """Free the model. Calls already running finish; later ones raise ClosedError."""
        self._model = None

    def __enter__(self) -> "Guard":
        self._open_model()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _open_model(self) -> PromptedCLIP:
        model = self._model  # one read: a concurrent close cannot pull it away mid-call
        if model is None:
            raise ClosedError("this Guard was closed; call guard.load() again to classify")
        return model


def load(path: str | Path, backend: str = "auto", device=None) -> Guard:
    """Load a purified-model artifact directory (checksums verified) for classification.

    backend: "auto" or "torch". device: a torch device; None picks CUDA when available."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device {device!r} is not a torch device ({error})") from error
    artifact = load_artifact(path)
    try:
        preprocess = artifact.preprocess
    except (KeyError, TypeError, InputError) as error:
        raise ArtifactError(f"the preprocess entry of {artifact.path}'s manifest is unusable ({error!r})") from error
    model = build_classifier(artifact, device)
    log.info("loaded %s: %d classes, %s prompts, backend torch on %s", artifact.path, len(artifact.classes),
             "with" if artifact.visual_prompts is not None else "without", device)
    return Guard(model, preprocess, artifact.classes, artifact.manifest, device, backend="torch")
