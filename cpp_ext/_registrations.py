"""The Python side of the clip_guard operators: fake (meta) kernels and autograd formulas.

The schemas live in csrc/ops.cpp, so these are registered by `register()` once the
library is loaded (`cpp_ext._build.load` calls it). The fake kernels repeat the C++
input checks with `torch._check`, so tracing and export fail as eagerly as a real call.
"""
from __future__ import annotations

import torch

_REGISTERED = False
_HALF_TYPES = (torch.float16, torch.bfloat16)
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_prompt_attention(q, k, v, prompt_k, prompt_v) -> None:
    name = "clip_guard::prompt_attention"
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{name}: q, k and v must be 4-D [N, H, T, d], got {tuple(q.shape)}, {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    torch._check(prompt_k.dim() == 3 and prompt_v.dim() == 3,
                 lambda: f"{name}: prompt_k and prompt_v must be 3-D [H, b, d], got {tuple(prompt_k.shape)} and "
                         f"{tuple(prompt_v.shape)}")
    for i in range(4):
        torch._check(k.shape[i] == v.shape[i], lambda: f"{name}: k and v must have the same shape")
    for i in (0, 1, 3):
        torch._check(k.shape[i] == q.shape[i],
                     lambda: f"{name}: k and v must match q in batch, heads and head width")
    for i in range(3):
        torch._check(prompt_k.shape[i] == prompt_v.shape[i],
                     lambda: f"{name}: prompt_k and prompt_v must have the same shape")
    torch._check(prompt_k.shape[0] == q.shape[1], lambda: f"{name}: prompt_k and q differ in the number of heads")
    torch._check(prompt_k.shape[2] == q.shape[3], lambda: f"{name}: prompt_k and q differ in head width")
    torch._check(q.dtype in _FLOAT_TYPES,
                 lambda: f"{name}: supports float32, float16, bfloat16 and float64, got {q.dtype}")
    for other in (k, v, prompt_k, prompt_v):
        torch._check(other.dtype == q.dtype, lambda: f"{name}: all inputs must have one dtype")
        torch._check(other.device == q.device, lambda: f"{name}: all inputs must be on one device")


def _prompt_attention_fake(q, k, v, prompt_k, prompt_v):
    _check_prompt_attention(q, k, v, prompt_k, prompt_v)
    return q.new_empty(q.shape)


def _prompt_attention_backward_fake(grad, q, k, v, prompt_k, prompt_v):
    _check_prompt_attention(q, k, v, prompt_k, prompt_v)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prompt_k.new_empty(prompt_k.shape),
            prompt_v.new_empty(prompt_v.shape))


def _prompt_attention_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _prompt_attention_backward(ctx, grad):
    grads = torch.ops.clip_guard.prompt_attention_backward(grad.contiguous(), *ctx.saved_tensors)
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad, strict=False))


def _insert_prompts_fake(tokens, prompts):
    name = "clip_guard::insert_prompts"
    torch._check(tokens.dim() == 3, lambda: f"{name}: tokens must be 3-D [N, 1+T, D], got {tuple(tokens.shape)}")
    torch._check(prompts.dim() == 2, lambda: f"{name}: prompts must be 2-D [b, D], got {tuple(prompts.shape)}")
    torch._check(tokens.shape[1] >= 1, lambda: f"{name}: tokens need a class token")
    torch._check(prompts.shape[1] == tokens.shape[2], lambda: f"{name}: prompts and tokens differ in width")
    torch._check(prompts.dtype == tokens.dtype, lambda: f"{name}: tokens and prompts must have one dtype")
    torch._check(prompts.device == tokens.device, lambda: f"{name}: tokens and prompts must be on one device")
    return tokens.new_empty((tokens.shape[0], tokens.shape[1] + prompts.shape[0], tokens.shape[2]))


def _insert_prompts_setup_context(ctx, inputs, output) -> None:
    ctx.num_prompts = inputs[1].shape[0]


def _insert_prompts_backward(ctx, grad):
    """grad tokens: the rows that were tokens; grad prompts: the prompt rows summed over the batch."""
    count = ctx.num_prompts
    grad_tokens = grad_prompts = None
    if ctx.needs_input_grad[0]:
        grad_tokens = torch.cat([grad[:, :1], grad[:, 1 + count:]], dim=1)
    if ctx.needs_input_grad[1]:
        prompt_rows = grad[:, 1:1 + count]
        if grad.dtype in _HALF_TYPES:  # accumulate in float32
            grad_prompts = prompt_rows.sum(0, dtype=torch.float32).to(grad.dtype)
        else:
            grad_prompts = prompt_rows.sum(0)
    return grad_tokens, grad_prompts


def register() -> None:
    """Register the fake kernels and autograd formulas (once; the library must be loaded)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("clip_guard::prompt_attention", _prompt_attention_fake)
    torch.library.register_fake("clip_guard::prompt_attention_backward", _prompt_attention_backward_fake)
    torch.library.register_fake("clip_guard::insert_prompts", _insert_prompts_fake)
    torch.library.register_autograd("clip_guard::prompt_attention", _prompt_attention_backward,
                                    setup_context=_prompt_attention_setup_context)
    torch.library.register_autograd("clip_guard::insert_prompts", _insert_prompts_backward,
                                    setup_context=_insert_prompts_setup_context)
    _REGISTERED = True
