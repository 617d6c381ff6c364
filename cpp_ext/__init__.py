"""clip_guard custom operators: the folded prompt attention and the prompt insertion, fused.

    clip_guard::prompt_attention(q, k, v, prompt_k, prompt_v) -> Tensor
    clip_guard::insert_prompts(tokens, prompts) -> Tensor

A CPU kernel (csrc/*.cpp), a CUDA kernel (csrc/cuda/*.cu), fake kernels for tracing
and export, and autograd. Importing this package builds nothing: the first call of
`load()`, `is_available()`, `status()` or a wrapper compiles the extension just in time
(about a minute on 2 cores, CPU part) or loads the cached build; a failed build is
recorded, never raised, and the wrappers then raise `ExtensionUnavailableError` (an
ImportError; `require()` raises it too). This package imports nothing from guard.
See docs/cpp_ext.md.
"""
from ._build import ExtensionStatus, build_directory, load, load_if_built, require, status
from .errors import ExtensionError, ExtensionUnavailableError
from .nvcc import ARCHITECTURES, CudaCompileResult, compile_cuda_kernels, find_nvcc
from .ops import insert_prompts, prompt_attention


def is_available() -> bool:
    """Whether the operators can be called (builds or loads the extension on first call)."""
    return load()


__all__ = ["ARCHITECTURES", "CudaCompileResult", "ExtensionError", "ExtensionStatus", "ExtensionUnavailableError",
           "build_directory", "compile_cuda_kernels", "find_nvcc", "insert_prompts", "is_available", "load",
           "load_if_built", "prompt_attention", "require", "status"]
