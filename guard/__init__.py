"""clip-guard runtime: load a purified CLIP and classify images."""
from .errors import (ArtifactError, ChecksumError, ClipGuardError, DataError, InputError,
                     MissingDependencyError, ModelLoadError)

__version__ = "0.1.0"

__all__ = ["ArtifactError", "ChecksumError", "ClipGuardError", "DataError", "InputError",
           "MissingDependencyError", "ModelLoadError", "__version__"]
