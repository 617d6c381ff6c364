"""Just-in-time build of the clip_guard C++/CUDA operators, cached on disk.

`load()` compiles the sources in `csrc/` with `torch.utils.cpp_extension.load` into a
build directory keyed by the torch version (a later process only loads the cached
library), loads it into the process and registers the Python parts (fake kernels,
autograd). It never raises: a failed build is recorded, and `status()` says why.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ExtensionUnavailableError

logger = logging.getLogger(__name__)

EXTENSION_NAME = "clip_guard_cpp_ext"
OPERATORS = ("prompt_attention", "prompt_attention_backward", "insert_prompts")
CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("ops.cpp", "prompt_attention.cpp", "insert_prompts.cpp")
# The kernels need only CUDA headers; register.cpp is the torch-facing side (CUDA torch only).
CUDA_KERNEL_SOURCES = ("cuda/prompt_attention.cu", "cuda/insert_prompts.cu")
CUDA_SOURCES = CUDA_KERNEL_SOURCES + ("cuda/register.cpp",)
# at::parallel_for needs OpenMP; torch itself is built with it (its own libgomp).
CXX_FLAGS = ("-O3", "-fopenmp")
LD_FLAGS = ("-fopenmp",)
CUDA_FLAGS = ("-O3",)
BUILD_HINT = ("build it with `python -m cpp_ext build` (needs a C++ compiler, ninja and the torch headers; "
              "CUDA kernels also need nvcc and a CUDA build of torch)")


@dataclass
class _State:
    attempted: bool = False
    available: bool = False
    error: str | None = None
    cuda_note: str | None = None
    build_directory: str | None = None
    seconds: float | None = None
    with_cuda: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _State()


def build_directory(with_cuda: bool) -> Path:
    """Where the extension is built and cached: $TORCH_EXTENSIONS_DIR/clip_guard_cpp_ext/<torch>
    if that variable is set, else ~/.cache/clip-guard/cpp_ext/<torch> (XDG_CACHE_HOME respected).
    The torch version (and CUDA version) names the directory: a library never meets another torch."""
    flavour = f"torch-{torch.__version__}-{'cu' + str(torch.version.cuda) if with_cuda else 'cpu'}"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / EXTENSION_NAME
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = cache / "clip-guard" / "cpp_ext"
    return root / flavour


def cuda_build_possible() -> tuple[bool, str | None]:
    """(whether the CUDA kernels can be built here, why not)."""
    if torch.version.cuda is None:
        return False, "torch has no CUDA (a CPU build)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    return True, None


def load(verbose: bool = False) -> bool:
    """Build (or load the cached build of) the extension once per process; True if it loaded.

    Never raises for a failed build: the reason is kept for `status()` and the wrappers' errors."""
    if _STATE.attempted:
        return _STATE.available
    with _STATE.lock:
        if not _STATE.attempted:
            _build_and_load(verbose)
    return _STATE.available


def load_if_built() -> bool:
    """Load the extension only if a build is already cached here (never compiles); True if it loaded.

    What serving uses: loading a model must not start a minute-long compile."""
    if _STATE.attempted:
        return _STATE.available
    with_cuda, _ = cuda_build_possible()
    if not (build_directory(with_cuda) / f"{EXTENSION_NAME}.so").is_file():
        return False
    return load()


def require(build: bool = True) -> None:
    """Raise `ExtensionUnavailableError` (with the reason and how to build) unless the operators
    can be called. build=False only loads a cached build, never compiles (what serving uses)."""
    if load() if build else load_if_built():
        return
    if _STATE.attempted:
        reason = error_summary() or "unknown reason"
    else:
        reason = f"no build is cached in {build_directory(cuda_build_possible()[0])}"
    raise ExtensionUnavailableError(f"the clip_guard C++ extension is not available ({reason}); {BUILD_HINT}. "
                                    "`python -m cpp_ext status` shows the whole build log.")


def _build_and_load(verbose: bool) -> None:
    with_cuda, _STATE.cuda_note = cuda_build_possible()
    start = time.perf_counter()
    try:
        error = _compile_and_load(with_cuda, verbose)
        if error is not None and with_cuda:
            # A broken CUDA toolchain must not cost the CPU kernels: try again without it.
            _STATE.cuda_note = f"the CUDA build failed ({_summarise(error)}); built for the CPU only"
            logger.warning("clip_guard CUDA kernels: %s", _STATE.cuda_note)
            error = _compile_and_load(False, verbose)
        if error is None:
            from . import _registrations
            _registrations.register()
            _STATE.available = True
            logger.info("clip_guard C++ extension loaded from %s", _STATE.build_directory)
        else:
            _STATE.error = error
            logger.warning("clip_guard C++ extension unavailable (%s); %s", error_summary(), BUILD_HINT)
    finally:
        _STATE.seconds = round(time.perf_counter() - start, 3)
        _STATE.attempted = True


def _compile_and_load(with_cuda: bool, verbose: bool) -> str | None:
    """Build (if the cache is stale) and load the library; the error text if that failed."""
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    directory = build_directory(with_cuda)
    _STATE.with_cuda = with_cuda
    _STATE.build_directory = str(directory)
    try:
        from torch.utils import cpp_extension
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=EXTENSION_NAME, sources=[str(CSRC / source) for source in sources],
            extra_cflags=list(CXX_FLAGS), extra_ldflags=list(LD_FLAGS), extra_cuda_cflags=list(CUDA_FLAGS),
            build_directory=str(directory), with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    # What a build or load can raise: compiler or ninja missing or failing (RuntimeError,
    # OSError, SubprocessError), or an unloadable library (OSError, ImportError).
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}".strip()
    return None


def error() -> str | None:
    """Why the extension is unavailable, the whole build log (None if it loaded or was never tried)."""
    return _STATE.error


def error_summary(max_lines: int = 3, width: int = 200) -> str | None:
    """The lines of `error()` that say what went wrong (compiler errors, missing tools), shortened."""
    return None if _STATE.error is None else _summarise(_STATE.error, max_lines, width)


def _summarise(log: str, max_lines: int = 3, width: int = 200) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"error|not found|no such|FAILED|undefined", line, re.IGNORECASE)
               and not line.startswith(("RuntimeError: Error building", "FAILED:"))]
    chosen = list(dict.fromkeys(telling or lines[-2:]))[:max_lines]  # in order, each once
    return " | ".join(line if len(line) <= width else line[:width] + "..." for line in chosen)


def registered_kernels() -> tuple[str, ...]:
    """The devices ('cpu', 'cuda') that have a kernel for every clip_guard operator."""
    if not _STATE.available:
        return ()
    return tuple(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                 if all(_has_kernel(f"clip_guard::{op}", key) for op in OPERATORS))


def _has_kernel(qualified_name: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, dispatch_key)
    except RuntimeError:  # the operator does not exist: the library is not loaded
        return False


@dataclass(frozen=True)
class ExtensionStatus:
    """What an environment report needs to know about the extension."""
    available: bool
    attempted: bool
    kernels: tuple[str, ...]
    error: str | None          # the whole build log of a failed build
    error_summary: str | None  # its telling lines
    cuda_note: str | None
    build_directory: str | None
    load_seconds: float | None
    torch_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def status(build: bool = True) -> dict:
    """A dict for an environment report: available, kernels ('cpu', 'cuda'), why not.

    With build=True (the default) it first tries `load()`; with build=False it only reports."""
    if build:
        load()
    return ExtensionStatus(
        available=_STATE.available, attempted=_STATE.attempted, kernels=registered_kernels(), error=_STATE.error,
        error_summary=error_summary(), cuda_note=_STATE.cuda_note, build_directory=_STATE.build_directory,
        load_seconds=_STATE.seconds, torch_version=torch.__version__).to_dict()
