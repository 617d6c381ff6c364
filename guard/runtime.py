"""Serving a purified model: `load` an artifact or a compiled file, then `Guard.classify` images.

    with guard.load("artifacts/purified") as model:     # or "purified.onnx", ".pt2", ".engine"
        result = model.classify("photo.jpg")
        print(result.label, result.to_dict())

From an artifact only the image tower is rebuilt, in its folded serving form; the
class text embeddings come precomputed, so no text tower, tokenizer or base checkpoint
is needed at serving time. Compiled files need no model code at all (guard.backends).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .alert_kinds import AlertKind, AlertRows, alert_of, alert_rows, kind_of
from .alerts import AlertConfig, density_alert, density_rows
from .artifact import MANIFEST, Artifact, load_artifact
from .backends import BACKEND_NAMES, AOTIBackend, Backend, OnnxRuntimeBackend, TensorRTBackend, TorchBackend
from .errors import ArtifactError, ClosedError, InputError
from .folded import fold
from .inputs import resize_batch
from .manifest import Manifest
from .preprocess import Preprocess
from .prompted import PromptedCLIP, PromptedVisionEncoder
from .sidecar import read_sidecar, sidecar_path

log = logging.getLogger(__name__)


def build_classifier(artifact: Artifact, device=None) -> PromptedCLIP:
    """The artifact's prompted image tower and class embeddings as a frozen PromptedCLIP."""
    # Building modules draws random initial weights, all overwritten from the artifact;
    # fork_rng keeps loading a model from moving the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        return _build_classifier(artifact, device)


def _build_classifier(artifact: Artifact, device) -> PromptedCLIP:
    # The one place serving needs open_clip (and the torchvision it imports): a torch image
    # tower. Compiled files never get here, so they load without either.
    from ._compat import import_open_clip

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


# Classification.alert_status values.
ALERT_OFF = "off"                    # classify(..., alerts=False)
ALERT_UNCALIBRATED = "uncalibrated"  # a score but no threshold: run `python -m guard calibrate`
ALERT_CLEAR = "clear"                # score <= threshold
ALERT_RAISED = "alert"               # score > threshold: the input looks triggered


@dataclass(frozen=True)
class Classification:
    """The prediction for one image. probs: softmax of the logits, in class order.

    alert_score: the trigger-alert score (guard.alerts; higher = more suspicious), None
    when alerts were off. threshold: the model's calibrated threshold, None when not
    calibrated. alert: score > threshold, None unless both exist. alert_status says which
    case holds (ALERT_OFF, ALERT_UNCALIBRATED, ALERT_CLEAR or ALERT_RAISED)."""
    label: str
    index: int
    probs: tuple[float, ...] = field(repr=False)
    classes: tuple[str, ...] = field(repr=False)
    alert_score: Optional[float] = None
    threshold: Optional[float] = None
    alert: Optional[bool] = None
    alert_status: str = ALERT_OFF

    @property
    def score(self) -> float:
        return self.probs[self.index]

    def top_k(self, k: int) -> list[tuple[str, float]]:
        """The k most probable (class, probability) pairs, most probable first."""
        ranked = sorted(zip(self.classes, self.probs), key=lambda pair: pair[1], reverse=True)
        return ranked[:k]

    def to_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "probs": dict(zip(self.classes, self.probs)),
                "alert_score": self.alert_score, "threshold": self.threshold, "alert": self.alert,
                "alert_status": self.alert_status}

    def agrees_with(self, other: "Classification", tolerance: float = 1e-5) -> bool:
        """The same label, classes, threshold and alert outcome, with every probability and the alert
        score within `tolerance`: what two runs of one model share when only float rounding differs
        (a batch and a single image round differently in the matrix products of some backends)."""
        if (self.label, self.index, self.classes, self.threshold, self.alert, self.alert_status) != \
                (other.label, other.index, other.classes, other.threshold, other.alert, other.alert_status):
            return False
        if (self.alert_score is None) != (other.alert_score is None):
            return False
        if self.alert_score is not None and not abs(self.alert_score - other.alert_score) <= tolerance:
            return False
        return all(abs(mine - theirs) <= tolerance for mine, theirs in zip(self.probs, other.probs))

    @classmethod
    def from_dict(cls, data: dict) -> "Classification":
        """The inverse of to_dict: a result read back from JSON (the guard service's answers) equals
        the one that was written, floats included (JSON keeps Python floats exactly)."""
        try:
            probs = data["probs"]
            return cls(str(data["label"]), int(data["index"]), tuple(float(p) for p in probs.values()),
                       tuple(probs), data["alert_score"], data["threshold"], data["alert"], str(data["alert_status"]))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise InputError(f"not a classification result (the JSON of Classification.to_dict): {error!r}") \
                from error


def _classification(classes: tuple[str, ...], logits: torch.Tensor, score: Optional[float],
                    threshold: Optional[float]) -> Classification:
    index = int(logits.argmax())
    probs = tuple(logits.softmax(dim=-1).tolist())
    if score is None:
        return Classification(classes[index], index, probs, classes)
    if threshold is None:
        return Classification(classes[index], index, probs, classes, score, None, None, ALERT_UNCALIBRATED)
    alert = score > threshold
    return Classification(classes[index], index, probs, classes, score, threshold, alert,
                          ALERT_RAISED if alert else ALERT_CLEAR)


class Guard:
    """A loaded purified classifier. Thread-safe: classify keeps no state between calls,
    and backends whose engines hold per-call state serialise their own runs."""

    def __init__(self, backend: Backend, preprocess: Preprocess, classes: Sequence[str], manifest: Manifest | dict,
                 fitted_alert=None):
        self._backend: Optional[Backend] = backend
        self.preprocess = preprocess
        self.classes = tuple(classes)
        try:
            self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.from_document(manifest)
        except ArtifactError:
            backend.close()
            raise
        # what calibration fitted for the recorded alert (its kind's fitted_type: the feature
        # density, the input detector), if any
        self.fitted_alert = fitted_alert
        self.alert_config = self.manifest.alert_config
        kind = kind_of(self.alert_config.statistic)
        problem = None
        if kind.needs_tower_internals(self.alert_config) and not backend.serves_tower_internals:
            recorded = f"{self.alert_config.statistic} over {list(self.alert_config.views)}"
            problem = (f"the recorded alert ({recorded}) needs the frozen tower, the class token or what "
                       f"calibration fitted, which the {backend.name} backend cannot serve")
        elif kind.fitted_type is not None and alert_of(self.alert_config, fitted_alert).fitted is None:
            problem = (f"the recorded alert is the {self.alert_config.statistic}, but the model holds no fitted "
                       f"{self.alert_config.statistic}")
        if problem:
            backend.close()
            raise ArtifactError(f"{problem}; recalibrate without it (`python -m guard calibrate MODEL --data DATA "
                                "--statistic pr_terms --perturbations open:3,median:3`)")
        self.backend = backend.name
        self.device = backend.device
        self.backend_info = backend.describe()

    def __repr__(self) -> str:
        state = "closed" if self._backend is None else f"{len(self.classes)} classes"
        return f"Guard({state}, backend={self.backend!r}, device={str(self.device)!r})"

    def classify(self, inputs, batch_size: int = 64, alerts: bool = True):
        """One image -> Classification; a list or tuple of images -> list of Classification.

        An image is a PIL image, a file path, an HxW(x1|x3) numpy array or a CHW tensor
        (see guard.inputs). Lists run through the model batch_size images at a time. With
        alerts (the default) every result carries the trigger-alert score, computed in the
        same backend call as the classification (1 + K rows per image, K perturbations);
        alerts=False classifies only, one row per image."""
        single = not isinstance(inputs, (list, tuple))
        logits, scores = self._run(inputs, batch_size, self.alert_config if alerts else None)
        scores = [None] * len(logits) if scores is None else scores.tolist()
        threshold = self.alert_config.threshold
        results = [_classification(self.classes, row, score, threshold) for row, score in zip(logits, scores)]
        return results[0] if single else results

    def logits(self, inputs, batch_size: int = 64) -> torch.Tensor:
        """[N, C] float32 logits on the CPU; N = 1 for a single image."""
        return self._run(inputs, batch_size, None)[0]

    def alert_scores(self, inputs, batch_size: int = 64, config: Optional[AlertConfig] = None,
                     progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """[N] alert scores under `config` (default: the model's own alert config).
        progress(done, total) is called after every batch."""
        return self._run(inputs, batch_size, config or self.alert_config, progress)[1]

    def class_tokens(self, inputs, batch_size: int = 64, frozen: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], the last block's class tokens [N, D]) of the served model, or with
        frozen the class tokens of the frozen tower (the feature density's input; torch
        backend only). progress(done, total) is called after every batch."""
        backend = self._open_backend()
        backend.check_internals()
        config = density_alert(frozen)
        logits, tokens = [], []
        for resized in self._batches(inputs, batch_size, progress):
            rows = self._run_rows(backend, resized, config, class_token=True)
            logits.append(rows.logits[:len(resized)])
            tokens.append(density_rows(rows.class_token, len(resized), config))
        if not logits:
            return torch.empty(0, len(self.classes)), torch.empty(0, 0)
        return torch.cat(logits), torch.cat(tokens)

    def _run(self, inputs, batch_size: int, alert: Optional[AlertConfig],
             progress: Optional[Callable[[int, int], None]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits [N, C], alert scores [N] or None without an alert config)."""
        backend = self._open_backend()
        kind = None
        if alert is not None:
            kind = self._alert_kind(alert)
            if kind.needs_tower_internals(alert):
                backend.check_internals()
            kind.ready()
        logits, scores = [], []
        for resized in self._batches(inputs, batch_size, progress):
            if kind is None:
                logits.append(_run_in_pieces(backend, self.preprocess.normalize(resized))[0])
                continue
            rows = self._run_rows(backend, resized, alert, kind.reads_class_token)
            scores.append(kind.score(rows))
            logits.append(rows.logits[:len(resized)])  # the unperturbed images come first
        if not logits:
            return torch.empty(0, len(self.classes)), None if alert is None else torch.empty(0)
        return torch.cat(logits), None if alert is None else torch.cat(scores)

    def _run_rows(self, backend: Backend, resized: torch.Tensor, config: AlertConfig,
                  class_token: bool = False) -> AlertRows:
        """One backend call over expand_batch's rows of resized images (guard.alert_kinds.alert_rows)."""
        return alert_rows(partial(_run_in_pieces, backend), self.preprocess, resized, config, class_token)

    def _alert_kind(self, config: AlertConfig) -> AlertKind:
        """The alert kind of `config` with what calibration fitted for this model, where it is
        that kind's (read at every call: a caller may swap fitted_alert between calls)."""
        return alert_of(config, self.fitted_alert)

    def resized(self, inputs, batch_size: int = 64,
                progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Inputs (anything classify takes; one image gives a batch of one) resized as the model
        sees them before normalisation: float [N, 3, S, S] in [0, 1] on the CPU."""
        batches = list(self._batches(inputs, batch_size, progress))
        size = self.preprocess.image_size
        return torch.cat(batches) if batches else torch.empty(0, 3, size, size)

    def _batches(self, inputs, batch_size: int, progress: Optional[Callable[[int, int], None]]):
        """Resized float images [B, 3, S, S] on the CPU, batch_size inputs at a time; one input
        or a list (a bad item's error names its index in the list)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(inputs, (list, tuple)):
            items, first_index = list(inputs), 0
        else:
            items, first_index = [inputs], None  # a single image: its errors name no list index
        for start in range(0, len(items), batch_size):
            resized = resize_batch(items[start:start + batch_size], self.preprocess, torch.device("cpu"),
                                   None if first_index is None else start)
            yield resized
            if progress is not None:
                progress(start + len(resized), len(items))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], embeddings [N, E]) of an already preprocessed float batch [N, 3, S, S],
        for pipelines that resize and normalise themselves (see `preprocess`)."""
        backend = self._open_backend()
        size = self.preprocess.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise InputError(f"forward takes a preprocessed float tensor [N, 3, {size}, {size}], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise InputError(f"forward takes a float tensor, got {images.dtype}")
        if len(images) == 0:
            return torch.empty(0, len(self.classes)), torch.empty(0, 0)
        return _run_in_pieces(backend, images.float())

    def close(self) -> None:
        """Release the backend. Calls already running finish; later ones raise ClosedError."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> "Guard":
        self._open_backend()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _open_backend(self) -> Backend:
        backend = self._backend  # one read: a concurrent close cannot pull it away mid-call
        if backend is None:
            raise ClosedError("this Guard was closed; call guard.load() again to classify")
        return backend


def _run_in_pieces(backend: Backend, images: torch.Tensor, frozen_rows: int = 0,
                   class_token: bool = False) -> tuple[torch.Tensor, ...]:
    """backend.run, in pieces no larger than the backend's maximum batch (compiled files have one;
    they serve no frozen rows or class tokens, so a call that asks for those is never split)."""
    if backend.max_batch is None or len(images) <= backend.max_batch or frozen_rows or class_token:
        return backend.run(images, frozen_rows, class_token)
    pieces = [backend.run(chunk) for chunk in images.split(backend.max_batch)]
    return torch.cat([piece[0] for piece in pieces]), torch.cat([piece[1] for piece in pieces])


# File type -> (sidecar kind, backends that run it); a directory is an artifact.
_COMPILED = {".onnx": ("onnx", ("onnxruntime",)), ".pt2": ("aoti", ("aoti",)),
             ".engine": ("tensorrt", ("tensorrt",)), ".plan": ("tensorrt", ("tensorrt",))}


def model_kind(path: Path) -> tuple[str, tuple[str, ...]]:
    """("artifact" or a sidecar kind, the backends that run it) for a model path."""
    if path.is_dir():
        return "artifact", ("torch",)
    if path.suffix in _COMPILED:
        return _COMPILED[path.suffix]
    raise InputError(f"{path} is neither an artifact directory nor a compiled model "
                     f"({', '.join(_COMPILED)})" + ("" if path.exists() else "; it does not exist"))


def load(path: str | Path, backend: str = "auto", device=None) -> Guard:
    """Load a purified model for classification; every file's checksum is verified.

    path: an artifact directory (torch backend), or a compiled file with its sidecar:
    `.onnx` (onnxruntime), `.pt2` (aoti), `.engine` (tensorrt). backend: "auto" picks
    by path; naming one that cannot run the path is an InputError. device: a torch
    device; None picks CUDA when available."""
    path = Path(path)
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise InputError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device {device!r} is not a torch device ({error})") from error
    kind, runners = model_kind(path)
    if backend != "auto" and backend not in runners:
        raise InputError(f"backend {backend!r} cannot run {path.name}; it runs with {' or '.join(runners)}")
    if kind == "artifact":
        return _load_artifact(path, device)
    return _load_compiled(path, kind, device)


def _load_artifact(path: Path, device: torch.device) -> Guard:
    artifact = load_artifact(path)
    manifest = Manifest.from_document(artifact.manifest, artifact.path / MANIFEST)
    model = fold(build_classifier(artifact, device), fused=None)
    log.info("loaded %s: %d classes, %d folded prompt blocks (%s attention), backend torch on %s", artifact.path,
             len(artifact.classes), model.num_folded_blocks, "fused C++" if model.fused else "standard", device)
    fitted_alert = None
    if artifact.alert_state is not None:
        statistic = manifest.alert_config.statistic
        try:
            fitted_alert = kind_of(statistic).load_fitted(artifact.alert_state)
        except InputError as error:
            raise ArtifactError(f"the fitted {statistic} of {artifact.path} is unusable ({error}); recalibrate it") \
                from error
        if isinstance(fitted_alert, torch.nn.Module):  # a fitted network runs where the model does
            fitted_alert.to(device)
    return Guard(TorchBackend(model, device), manifest.preprocess, manifest.classes, manifest, fitted_alert)


def _load_compiled(path: Path, kind: str, device: torch.device) -> Guard:
    manifest = Manifest.from_document(read_sidecar(path, kind), sidecar_path(path))
    if kind == "onnx":
        if manifest.details().get("attention") == "custom":
            raise ArtifactError(f"{path} has clip_guard::PromptAttention nodes, made for a TensorRT plugin; "
                                "onnxruntime has no kernel for them: serve the standard export "
                                "(`python -m export.onnx PURIFIED --out purified.onnx`)")
        backend = OnnxRuntimeBackend(path, device, manifest.precision)
    elif kind == "aoti":
        backend = AOTIBackend(path, device, manifest.details())
    else:
        backend = TensorRTBackend(path, device, manifest.document)
    log.info("loaded %s: %d classes, %s", path, len(manifest.classes), backend.describe())
    return Guard(backend, manifest.preprocess, manifest.classes, manifest)
