"""The typed view of a model's document: an artifact's manifest.json or a compiled file's sidecar.

    manifest = Manifest.from_document(read_manifest(path), path / MANIFEST)
    manifest.classes, manifest.preprocess, manifest.alert_config, manifest.precision

guard.artifact and guard.sidecar read and seal the documents (format, version, checksums);
`Manifest` checks what serving reads from them, field by field, when they are read: a
field that is missing or of the wrong type is an ArtifactError that names it and says
what to do, instead of a KeyError deep in the runtime. The format on disk is unchanged
(format version 1 of both documents), so every existing artifact and sidecar reads as
before. `document` keeps the whole document as written, for the fields serving does not
read (the method's hyperparameters, an engine's build details) and for writing it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .alerts import AlertConfig
from .errors import ArtifactError, InputError
from .preprocess import Preprocess

ARTIFACT_FORMAT = "clip-guard/purified"  # the one definition; guard.artifact.FORMAT names it
CHECKSUM_KEYS = ("manifest_sha256", "sidecar_sha256")
_REMEDY = {"artifact": "re-create the artifact or restore it from a copy", "compiled": "re-run the export"}


@dataclass(frozen=True)
class Manifest:
    """What a model's document says, checked. kind: "artifact" for an artifact directory,
    else the compiled file's kind ("onnx", "aoti", "tensorrt"). alert: the recorded alert,
    None when the model was never calibrated (alert_config is then the default)."""
    kind: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    base_model: dict
    precision: str
    files: dict
    method: Optional[dict] = None
    metrics: dict = field(default_factory=dict)
    alert: Optional[AlertConfig] = None
    alert_calibration: Optional[dict] = None
    checksum: Optional[str] = None
    path: Optional[Path] = None
    document: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_document(cls, document: dict, path: Optional[str | Path] = None) -> "Manifest":
        """Check the fields of a document read by guard.artifact.read_manifest or
        guard.sidecar.read_sidecar (path: the file it came from, for messages)."""
        where = str(path) if path is not None else "the model's manifest"
        if not isinstance(document, dict):
            raise ArtifactError(f"{where} is not a JSON object; {_REMEDY['artifact']}")
        kind = "artifact" if document.get("format") == ARTIFACT_FORMAT else document.get("kind")
        remedy = _REMEDY["artifact" if kind == "artifact" else "compiled"]

        def bad(name: str, expected: str, error: Optional[Exception] = None) -> ArtifactError:
            why = f" ({error})" if error is not None else f", got {document.get(name)!r}"
            return ArtifactError(f"the {name!r} entry of {where} is unusable: expected {expected}{why}; {remedy}")

        if not isinstance(kind, str) or not kind:
            raise bad("kind", "the compiled model's kind (onnx, aoti, tensorrt)")
        classes = document.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
            raise bad("classes", "a non-empty list of class names")
        try:
            preprocess = Preprocess.from_dict(document["preprocess"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # InputError is a ValueError
            raise bad("preprocess", "the preprocessing (image_size, mean, std)", error) from error
        base_model = document.get("base_model")
        if not isinstance(base_model, dict):
            raise bad("base_model", "the base model's identity (an object)")
        precision = document.get("precision", "fp32")  # artifacts are fp32 and do not say so
        if not isinstance(precision, str):
            raise bad("precision", "fp32, fp16 or int8")
        files = document.get("files")
        if not isinstance(files, dict) or not all(isinstance(record, dict) and isinstance(record.get("sha256"), str)
                                                  for record in files.values()):
            raise bad("files", "a table of file names to their size and sha256")
        method = document.get("method")
        if method is not None and not isinstance(method, dict):
            raise bad("method", "the method's name and hyperparameters (an object)")
        metrics = document.get("metrics", {})
        if not isinstance(metrics, dict):
            raise bad("metrics", "an object of metrics")
        alert = None
        if document.get("alert") is not None:
            try:
                alert = AlertConfig.from_dict(document["alert"])
            except InputError as error:
                raise ArtifactError(f"the alert entry of {where} is unusable ({error}); re-run "
                                    "`python -m guard calibrate`") from error
        calibration = document.get("alert_calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise bad("alert_calibration", "the calibration record (an object)")
        checksum = next((document[key] for key in CHECKSUM_KEYS if isinstance(document.get(key), str)), None)
        return cls(kind, tuple(classes), preprocess, base_model, precision, files, method, metrics, alert,
                   calibration, checksum, None if path is None else Path(path), document)

    @property
    def alert_config(self) -> AlertConfig:
        """The recorded alert, or the uncalibrated default when there is none."""
        return self.alert if self.alert is not None else AlertConfig()

    def details(self) -> dict:
        """A compiled model's own entry (document[kind]: the ONNX attention, an engine's build)."""
        details = self.document.get(self.kind)
        if not isinstance(details, dict):
            raise ArtifactError(f"the {self.kind!r} entry of {self.path or 'the sidecar'} is missing; "
                                "re-run the export")
        return details

    # Read access to the document as written, for code that reads entries not typed here.
    def __getitem__(self, key: str) -> Any:
        return self.document[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.document.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.document
