"""Typed errors. Each also subclasses the builtin a caller would expect, so
`except ValueError` keeps working, and each message says what to do next."""


class ClipGuardError(Exception):
    """Base class of every error clip-guard raises on purpose."""


class InputError(ClipGuardError, ValueError):
    """An image or argument handed to clip-guard cannot be used."""


class ModelLoadError(ClipGuardError, ValueError):
    """A CLIP checkpoint or model name could not be turned into a model."""


class ArtifactError(ClipGuardError, ValueError):
    """A purified-model directory is missing, malformed or of another format version."""


class ChecksumError(ArtifactError):
    """A file of an artifact or a base model does not match its recorded sha256."""


class DataError(ClipGuardError, ValueError):
    """A data set could not be found or read."""


class MissingDependencyError(ClipGuardError, ImportError):
    """An optional package needed for the requested feature is not installed."""


class ClosedError(ClipGuardError, RuntimeError):
    """A `Guard` was used after `close()`; load the artifact again."""


class ExportError(ClipGuardError, RuntimeError):
    """A model could not be compiled, or the compiled model disagrees with the reference."""


class ServiceError(ClipGuardError, RuntimeError):
    """A model server (the guard service, Triton) could not be reached or failed to answer."""
