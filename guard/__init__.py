"""clip-guard runtime: load a purified CLIP and classify images."""
from .errors import (ArtifactError, ChecksumError, ClipGuardError, ClosedError, DataError, ExportError, InputError,
                     MissingDependencyError, ModelLoadError, ServiceError)

__version__ = "0.1.0"

# After __version__: guard.artifact reads it while this package is still importing.
from .runtime import Classification, Guard, load  # noqa: E402

__all__ = ["ArtifactError", "ChecksumError", "Classification", "ClipGuardError", "ClosedError", "DataError",
           "ExportError", "Guard", "InputError", "MissingDependencyError", "ModelLoadError", "ServiceError",
           "__version__", "load"]
