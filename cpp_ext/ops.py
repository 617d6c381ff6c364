"""Typed Python wrappers of the clip_guard operators.

Each builds (or loads the cached build of) the extension on first use and raises
`ExtensionUnavailableError` (an ImportError) with the build error and how to build when it
is unavailable.
"""
from __future__ import annotations

import torch

from . import _build


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                     prompt_v: torch.Tensor) -> torch.Tensor:
    """softmax(q [k ; prompt_k]^T / sqrt(d)) [v ; prompt_v], fused: the prompts are never expanded.

    q, k, v: [N, H, T, d] image-token queries, keys and values; prompt_k, prompt_v: [H, b, d],
    one block's constant prompt keys and values shared by every image. Returns [N, H, T, d]
    (contiguous). Same dtype and device for all inputs: float32, float16, bfloat16 (accumulated
    in float32) or float64. Differentiable in all five inputs; traceable by torch.compile and
    torch.export. The reference is `guard.folded.attend_with_prompts`."""
    if not _build._STATE.available:
        _build.require()
    return torch.ops.clip_guard.prompt_attention(q, k, v, prompt_k, prompt_v)


def insert_prompts(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[N, 1+T, D] tokens and [b, D] prompts -> [N, 1+b+T, D], the prompts after the class token.

    Same dtype and device for both. The gradient of the prompts is summed over the batch.
    The reference is `guard.prompted.insert_prompts`."""
    if not _build._STATE.available:
        _build.require()
    return torch.ops.clip_guard.insert_prompts(tokens, prompts)
