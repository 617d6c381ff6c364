"""The alert registry: every alert statistic is one `AlertKind` class, registered by name.

An `AlertConfig` (guard.alerts) says what an alert is: its statistic's name, its
perturbations, the frozen-tower option and the threshold. The statistic's kind says what
that means:

    check(config)                   which perturbations and options the statistic takes
    needs_tower_internals(config)   whether only the torch backend serves it
    reads_class_token               whether it reads the last block's class token
    kind(config, fitted).score(rows)  scores [N] from one backend call over expand_batch's rows
    kind(config).fit(data)          what calibration fits (nothing, by default) and the clean
                                    scores the threshold comes from
    to_manifest() / from_manifest() the manifest's "alert" entry and, for a fitted kind,
                                    the tensors of its artifact file (`fitted_file`)

The runtime, calibration, the CLI and the artifact code ask the registry (`kind_of`) and
never switch on a statistic's name. Adding an alert is one AlertKind subclass and one
`register(name, Kind)` call (docs/detection.md shows one).

Built in: `Resistivity` (the PR statistics of guard.alerts.STATISTICS, pr_terms the
default, with the frozen tower as an option), `Density` (the feature density,
guard.density) and `Detector` (the input detector, guard.detector).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Optional, Sequence

import torch

from .alerts import DENSITY, DETECTOR, STATISTICS, AlertConfig, alert_scores, density_scores, expand_batch
from .density import ClassDensity
from .detector import DetectorConfig, InputDetector, train_detector
from .errors import InputError

DENSITY_FILE = "alert_density.safetensors"
DETECTOR_FILE = "alert_detector.safetensors"


@dataclass(frozen=True)
class AlertRows:
    """One backend call over `expand_batch`'s N * (1 + K) rows for N images: the images as
    resized (float [N, 3, S, S] in [0, 1], CPU, before normalisation), the logits and
    embeddings of every row, and the class tokens where the kind reads them."""
    images: torch.Tensor
    logits: torch.Tensor
    embedding: torch.Tensor
    class_token: Optional[torch.Tensor] = None

    @property
    def n_images(self) -> int:
        return len(self.images)


# run(preprocessed images, frozen_rows, class_token) -> (logits, embedding[, class tokens]):
# Backend.run's signature, or an in-memory model's forward (training.detection).
Runner = Callable[[torch.Tensor, int, bool], tuple]


def alert_rows(run: Runner, preprocess, resized: torch.Tensor, config: AlertConfig,
               class_token: bool = False) -> AlertRows:
    """One call of `run` over expand_batch's rows of resized images [N, 3, S, S] in [0, 1],
    normalised with `preprocess` (a guard.preprocess.Preprocess); the frozen-tower rows come
    last. How the guard serves an alert, and how training.detection measures one (gradients
    flow when run's do)."""
    expanded = preprocess.normalize(expand_batch(resized, config))
    return AlertRows(resized, *run(expanded, len(resized) if config.frozen_tower else 0, class_token))


@dataclass
class FitData:
    """What calibration hands a kind's `fit`. model: the loaded Guard (its class_tokens,
    resized and alert_scores); images: clean images classify takes; labels: their class
    indices or None; options: settings of individual kinds, by statistic name (the
    detector's DetectorConfig under "detector")."""
    model: object
    images: Sequence
    labels: Optional[Sequence[int]] = None
    batch_size: int = 64
    progress: Optional[Callable[[int, int], None]] = None
    training_progress: Optional[Callable[[int, int], None]] = None
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Fit:
    """A kind's calibration: the (fitted) alert, the clean scores its threshold is the
    quantile of, and what the calibration record adds (fit_images and the like)."""
    alert: "AlertKind"
    scores: torch.Tensor
    record: dict = field(default_factory=dict)


class AlertKind:
    """One alert statistic under one config, with what calibration fitted for it (if any).

    Subclasses implement `score`, and where calibration fits something set `fitted_type`
    and `fitted_file` and implement `fit`, `fitted_tensors` and `load_fitted`."""
    fitted_type: ClassVar[Optional[type]] = None  # what fit() learns; None: nothing
    fitted_file: ClassVar[Optional[str]] = None   # the artifact file that keeps it
    reads_class_token: ClassVar[bool] = False
    calibration_images: ClassVar[int] = 2000      # how many clean images calibration uses by default

    def __init__(self, config: AlertConfig, fitted=None):
        expected = self.fitted_type or type(None)
        if fitted is not None and not isinstance(fitted, expected):
            raise InputError(f"the {config.statistic!r} alert statistic needs "
                             + ("nothing fitted" if self.fitted_type is None else f"a fitted {expected.__name__}")
                             + f", got {type(fitted).__name__}")
        self.config = config
        self.fitted = fitted

    @classmethod
    def check(cls, config: AlertConfig) -> None:
        """Raise InputError when the statistic cannot take the config's perturbations or options."""

    @classmethod
    def needs_tower_internals(cls, config: AlertConfig) -> bool:
        """Only the torch backend serves the frozen tower, the class token and fitted state
        (compiled graphs have the prompts folded in, and sidecars hold no fitted state)."""
        return config.frozen_tower or cls.reads_class_token or cls.fitted_type is not None

    @property
    def name(self) -> str:
        return self.config.statistic

    def score(self, rows: AlertRows) -> torch.Tensor:
        """Scores [N], float32 on the CPU; higher = more suspicious."""
        raise NotImplementedError

    def fit(self, data: FitData) -> Fit:
        """Calibration: by default nothing is fitted and every clean image is scored."""
        model = data.model
        return Fit(self, model.alert_scores(data.images, data.batch_size, self.config, data.progress).double())

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def load_fitted(cls, tensors: dict[str, torch.Tensor]):
        raise NotImplementedError

    def to_manifest(self) -> tuple[dict, Optional[dict[str, torch.Tensor]]]:
        """(the manifest's "alert" entry, the tensors of `fitted_file` or None)."""
        if self.fitted_type is not None and self.fitted is None:
            raise InputError(f"the {self.name!r} alert statistic needs a fitted {self.fitted_type.__name__}")
        tensors = None if self.fitted is None else self.fitted_tensors()
        return self.config.to_dict(), tensors

    @classmethod
    def from_manifest(cls, entry: dict, tensors: Optional[dict[str, torch.Tensor]] = None) -> "AlertKind":
        """The inverse of to_manifest; InputError when the entry or the tensors are unusable."""
        config = AlertConfig.from_dict(entry)
        return kind_of(config.statistic)(config, None if tensors is None else cls._loaded(config, tensors))

    @staticmethod
    def _loaded(config: AlertConfig, tensors: dict):
        kind = kind_of(config.statistic)
        if kind.fitted_type is None:
            raise InputError(f"the {config.statistic!r} alert statistic fits nothing, but fitted tensors came with it")
        return kind.load_fitted(tensors)

    def ready(self) -> None:
        """InputError when the kind needs a fitted state it does not have."""
        if self.fitted_type is not None and self.fitted is None:
            raise InputError(f"this model has no fitted {self.name}: calibrate it with "
                             f"`python -m guard calibrate MODEL --data DIR --statistic {self.name}`")


class Resistivity(AlertKind):
    """The perturbation resistivity family (guard.alerts.alert_scores): how far the
    embedding and the logits move under the perturbations and, as an option, through the
    frozen tower, where a trigger that purification removed still fires."""

    @classmethod
    def check(cls, config: AlertConfig) -> None:
        if not config.num_perturbations:
            raise InputError("an alert needs at least one perturbation")

    def score(self, rows: AlertRows) -> torch.Tensor:
        return alert_scores(rows.logits, rows.embedding, rows.n_images, self.config)


class Density(AlertKind):
    """The feature density (guard.density.ClassDensity) of the last block's class token, of
    the served tower or, with the frozen-tower option, of the frozen tower. Calibration fits
    it on every other clean image, labelled by the labels given or else by the model's own
    predictions, and sets the threshold on the rest: distances to a density fitted on the
    same images are biased low (measured: 1.65 to 2.4 % clean alerts on new images at an
    in-sample 1 % threshold; docs/detection.md)."""
    fitted_type = ClassDensity
    fitted_file = DENSITY_FILE
    reads_class_token = True

    @classmethod
    def check(cls, config: AlertConfig) -> None:
        if config.perturbations:
            raise InputError(f"the {DENSITY!r} statistic takes no perturbation (the served tower) or only "
                             f"the frozen tower, got {list(config.views)}")

    def score(self, rows: AlertRows) -> torch.Tensor:
        self.ready()
        return density_scores(rows.class_token, rows.n_images, self.config, self.fitted)

    def fit(self, data: FitData) -> Fit:
        # the image's rows are what a served density score reads: same class tokens, same scores
        logits, tokens = data.model.class_tokens(data.images, data.batch_size, self.config.frozen_tower,
                                                 data.progress)
        labels = _density_labels(data.labels, logits)
        density = ClassDensity.fit(tokens[0::2], labels[0::2], logits.shape[1])
        return Fit(type(self)(self.config, density), density.score(tokens[1::2]).double(),
                   {"fit_images": len(tokens[0::2])})

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return self.fitted.to_tensors()

    @classmethod
    def load_fitted(cls, tensors):
        return ClassDensity.from_tensors(tensors)


def _density_labels(labels: Optional[Sequence[int]], logits: torch.Tensor) -> torch.Tensor:
    if labels is None:
        predicted = logits.argmax(-1)
        missing = (torch.bincount(predicted, minlength=logits.shape[1]) == 0).nonzero().flatten().tolist()
        if missing:
            raise InputError(f"the model predicts none of the calibration images as classes {missing}; the feature "
                             "density needs clean images of every class: add some, or pass their labels")
        return predicted
    labels = torch.as_tensor(list(labels))
    if labels.shape != (len(logits),) or labels.is_floating_point():
        raise InputError(f"labels must be {len(logits)} class indices, one per image, got shape {tuple(labels.shape)}")
    return labels


class Detector(AlertKind):
    """The input detector (guard.detector.InputDetector): a small CNN on the resized input,
    trained when calibrating on every other clean image against synthetic triggers (the
    DetectorConfig under FitData.options["detector"]); the threshold comes from the rest."""
    fitted_type = InputDetector
    fitted_file = DETECTOR_FILE
    calibration_images = 4000  # it trains on half and needs about 2,000 (docs/detection.md)

    @classmethod
    def check(cls, config: AlertConfig) -> None:
        if config.num_perturbations:
            raise InputError(f"the {DETECTOR!r} statistic reads the input itself and takes no perturbation, got "
                             f"{list(config.views)}")

    def score(self, rows: AlertRows) -> torch.Tensor:
        self.ready()
        device = next(self.fitted.parameters()).device  # the detector runs where the model does
        with torch.no_grad():
            return self.fitted(rows.images.to(device)).float().cpu()

    def fit(self, data: FitData) -> Fit:
        settings = data.options.get(DETECTOR) or DetectorConfig()
        resized = data.model.resized(data.images, data.batch_size, data.progress)
        detector = train_detector(resized[0::2], settings, data.training_progress)
        with torch.no_grad():
            scores = detector(resized[1::2]).double()
        return Fit(type(self)(self.config, detector), scores,
                   {"fit_images": len(resized[0::2]), "detector": settings.to_dict()})

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return self.fitted.to_tensors()

    @classmethod
    def load_fitted(cls, tensors):
        return InputDetector.from_tensors(tensors)


# --- the registry --------------------------------------------------------------------------

REGISTRY: dict[str, type[AlertKind]] = {}


def register(name: str, kind: type[AlertKind]) -> type[AlertKind]:
    """Make `kind` the alert statistic `name` (what AlertConfig.statistic and manifests say).
    A fitted kind's file name must be its own: two kinds cannot share an artifact file."""
    if not isinstance(name, str) or not name or ":" in name or name in REGISTRY:
        raise InputError(f"an alert statistic needs a new name without ':', got {name!r}"
                         + (f" (already {REGISTRY[name].__name__})" if name in REGISTRY else ""))
    if not (isinstance(kind, type) and issubclass(kind, AlertKind)):
        raise InputError(f"an alert kind is an AlertKind subclass, got {kind!r}")
    if kind.fitted_file is not None:
        taken = {other.fitted_file: other for other in REGISTRY.values()}
        if kind.fitted_file in taken and taken[kind.fitted_file] is not kind:
            raise InputError(f"{kind.__name__} would keep its fitted state in {kind.fitted_file}, which "
                             f"{taken[kind.fitted_file].__name__} uses; give it a file of its own")
    REGISTRY[name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove the statistic `name` (a plug-in's tests, say); built-in ones stay."""
    if name in _BUILT_IN:
        raise InputError(f"the built-in alert statistic {name!r} cannot be removed")
    REGISTRY.pop(name, None)


def kind_of(statistic: str) -> type[AlertKind]:
    """The kind registered as `statistic`; InputError naming the known ones otherwise."""
    kind = REGISTRY.get(statistic) if isinstance(statistic, str) else None
    if kind is None:
        raise InputError(f"unknown statistic {statistic!r}; known: {sorted(REGISTRY)}")
    return kind


def fitted_files() -> dict[str, str]:
    """statistic name -> the artifact file of what calibration fitted for it, for fitted kinds."""
    return {name: kind.fitted_file for name, kind in REGISTRY.items() if kind.fitted_file is not None}


def alert_of(config: AlertConfig, fitted=None) -> AlertKind:
    """The alert kind of `config`, with `fitted` where it is the kind's fitted type (a model
    fitted for another statistic serves this one unfitted)."""
    kind = kind_of(config.statistic)
    usable = kind.fitted_type is not None and isinstance(fitted, kind.fitted_type)
    return kind(config, fitted if usable else None)


for _statistic in STATISTICS:
    register(_statistic, Resistivity)
register(DENSITY, Density)
register(DETECTOR, Detector)
_BUILT_IN = frozenset(REGISTRY)

__all__ = ["AlertKind", "AlertRows", "Density", "Detector", "Fit", "FitData", "REGISTRY", "Resistivity", "Runner",
           "alert_of", "alert_rows", "fitted_files", "kind_of", "register", "unregister"]
