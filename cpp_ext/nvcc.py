"""Compile the CUDA kernels with nvcc on a machine without a GPU (or without a CUDA torch).

torch refuses to build a CUDAExtension against a CPU torch, but the kernels in
csrc/cuda/*.cu include only CUDA headers, so nvcc compiles them to objects for every
requested architecture and links them into a shared library whose C interface
(csrc/cuda/kernels.h) is checked. The torch-facing csrc/cuda/register.cpp includes no
CUDA header and is compiled (syntax and templates) against this torch's headers.
This is what CI can prove about the CUDA path; running it needs a GPU.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ._build import CSRC, CUDA_KERNEL_SOURCES

ARCHITECTURES = ("sm_80", "sm_90")
C_SYMBOLS = ("clip_guard_prompt_attention_forward_cuda", "clip_guard_insert_prompts_cuda")
_TIMEOUT_S = 600


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME or $CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidate = Path(os.environ[variable]) / "bin" / "nvcc"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


@dataclass(frozen=True)
class CudaCompileResult:
    """Outcome of `compile_cuda_kernels`; `ok` only if every step below succeeded."""
    ok: bool
    nvcc: str | None
    nvcc_version: str | None
    architectures: tuple[str, ...]
    # architecture -> whether nvcc produced both its machine code (cubin) and PTX for it
    compiled: dict
    library: str | None          # shared library of all kernels, all architectures
    c_symbols_found: bool           # its C interface is exported
    registration_compiled: bool | None  # register.cpp against torch's headers (None: not checked)
    log: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _run(command: list[str], log: list[str]) -> bool:
    log.append("$ " + " ".join(command))
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=_TIMEOUT_S)
    output = (completed.stdout + completed.stderr).strip()
    if output:
        log.append(output)
    if completed.returncode != 0:
        log.append(f"exit status {completed.returncode}")
    return completed.returncode == 0


def _gencode_flags(architectures: Sequence[str]) -> list[str]:
    flags = []
    for architecture in architectures:
        number = architecture.removeprefix("sm_")
        flags += ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
    return flags


def _compiled_architectures(keep_dir: Path, architectures: Sequence[str]) -> dict:
    """For each architecture: a cubin and a PTX whose .target names it, for every source."""
    compiled = {}
    for architecture in architectures:
        number = architecture.removeprefix("sm_")
        ok = True
        for source in CUDA_KERNEL_SOURCES:
            stem = Path(source).stem
            ptx = keep_dir / f"{stem}.compute_{number}.ptx"
            cubins = list(keep_dir.glob(f"{stem}.compute_{number}*.cubin"))
            target = re.search(r"^\.target\s+(\S+)", ptx.read_text(), re.MULTILINE) if ptx.is_file() else None
            ok = ok and bool(cubins) and target is not None and target.group(1) == f"sm_{number}"
        compiled[architecture] = ok
    return compiled


def _check_registration(log: list[str]) -> bool:
    """Compile csrc/cuda/register.cpp against this torch's headers (no CUDA headers needed)."""
    import torch
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return _run([compiler, "-std=c++17", "-fsyntax-only", abi, *includes, str(CSRC / "cuda" / "register.cpp")],
                log)


def compile_cuda_kernels(out_dir: os.PathLike | str, architectures: Sequence[str] = ARCHITECTURES,
                         nvcc: str | None = None, check_registration: bool = True) -> CudaCompileResult:
    """Compile csrc/cuda/*.cu for `architectures` (sm_80 and sm_90 by default) into out_dir.

    Each source becomes one object holding machine code and PTX for every architecture; the
    objects are linked into libclip_guard_cuda_kernels.so, loaded with ctypes (no GPU needed:
    the CUDA runtime is linked statically and initialised only on a first call) to check the
    C interface. Never raises for a compiler error: see `ok` and `log`."""
    start = time.perf_counter()
    out = Path(out_dir)
    keep_dir = out / "intermediate"
    keep_dir.mkdir(parents=True, exist_ok=True)
    architectures = tuple(architectures)
    log: list[str] = []
    nvcc = nvcc or find_nvcc()

    def result(ok: bool, **fields) -> CudaCompileResult:
        values = dict(nvcc=nvcc, nvcc_version=None, architectures=architectures, compiled={}, library=None,
                      c_symbols_found=False, registration_compiled=None)
        values.update(fields)
        return CudaCompileResult(ok=ok, log="\n".join(log), seconds=round(time.perf_counter() - start, 3), **values)

    if nvcc is None:
        log.append("nvcc not found: set CUDA_HOME or put nvcc on PATH")
        return result(False)
    version = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    version_line = version.strip().splitlines()[-1] if version.strip() else None

    objects = []
    sources_ok = True
    for source in CUDA_KERNEL_SOURCES:
        target = out / f"{Path(source).stem}.o"
        objects.append(str(target))
        sources_ok &= _run([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *_gencode_flags(architectures),
                            "-keep", "-keep-dir", str(keep_dir), "-c", str(CSRC / source), "-o", str(target)], log)
    if not sources_ok:
        return result(False, nvcc_version=version_line)
    compiled = _compiled_architectures(keep_dir, architectures)

    library = out / "libclip_guard_cuda_kernels.so"
    symbols_found = False
    if _run([nvcc, "-shared", *objects, "-o", str(library)], log):
        handle = ctypes.CDLL(str(library))
        symbols_found = all(hasattr(handle, symbol) for symbol in C_SYMBOLS)
        if not symbols_found:
            log.append(f"{library} lacks one of {', '.join(C_SYMBOLS)}")
    registration = _check_registration(log) if check_registration else None
    ok = all(compiled.values()) and symbols_found and registration is not False
    return result(ok, nvcc_version=version_line, compiled=compiled, library=str(library) if symbols_found else None,
                  c_symbols_found=symbols_found, registration_compiled=registration)
