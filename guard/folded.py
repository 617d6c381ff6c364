"""Serving form of a prompted image tower: the visual prompts folded into constant keys and values.

In VPT-deep the prompt outputs of a block are dropped before the next one, so a
prompt reaches the image tokens only through its keys and values in attention, and
those depend on the prompt alone (docs/methods.md, "Folding"). Per prompted block l:

    K_l = LN1(P_l) W_k + b_k,    V_l = LN1(P_l) W_v + b_v      (constants)

and the image tokens attend to [their own keys and values ; K_l, V_l]. No prompt
query, attention output or MLP is ever computed, so the folded tower costs little
more than the plain one. `PromptedCLIP` (the literal form) stays the training form;
tests prove the two agree.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import MissingDependencyError, ModelLoadError
from .prompted import PromptedCLIP, PromptedVisionEncoder, class_logits


def attend_with_prompts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        prompt_k: torch.Tensor, prompt_v: torch.Tensor) -> torch.Tensor:
    """softmax(q [k ; prompt_k]^T / sqrt(d)) [v ; prompt_v], the reference folded attention.

    q, k, v: [N, H, T, d] image-token queries, keys and values; prompt_k, prompt_v:
    [H, b, d] one block's constant prompt keys and values, shared by every image."""
    batch = q.shape[0]
    k = torch.cat([k, prompt_k.unsqueeze(0).expand(batch, -1, -1, -1)], dim=2)
    v = torch.cat([v, prompt_v.unsqueeze(0).expand(batch, -1, -1, -1)], dim=2)
    return F.scaled_dot_product_attention(q, k, v)


def _check_foldable(block: nn.Module, index: int) -> None:
    attention = getattr(block, "attn", None)
    problems = []
    if not isinstance(attention, nn.MultiheadAttention):
        problems.append("its attention is not an nn.MultiheadAttention")
    elif not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
        problems.append("its attention has separate q/k/v projections")
    elif attention.bias_k is not None or not attention.batch_first:
        problems.append("its attention has extra key biases or is not batch-first")
    if hasattr(block, "ln_1_kv"):
        problems.append("it is a cross-attention block")
    if not all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")):
        problems.append("it is not an open_clip ResidualAttentionBlock")
    if problems:
        raise ModelLoadError(f"block {index} of the image tower cannot be folded: {'; '.join(problems)}")


def require_fused_attention() -> None:
    """Raise `MissingDependencyError` (with cpp_ext's reason and how to build) unless the
    clip_guard C++ operator (cpp_ext) is built here and loaded.

    Serving never compiles it (`python -m cpp_ext build` does, as `make install` runs).
    cpp_ext knows nothing of guard: its own error is translated here."""
    try:
        import cpp_ext
    except ImportError as error:
        raise MissingDependencyError(f"the clip_guard C++ operator needs the cpp_ext package, which does not "
                                     f"import ({error}); install clip-guard from its source tree") from error
    try:
        cpp_ext.require(build=False)
    except cpp_ext.ExtensionUnavailableError as error:
        raise MissingDependencyError(str(error)) from error


def fused_attention_available() -> bool:
    """Whether the clip_guard C++ operator (cpp_ext) is built here and loaded; a missing
    build just means the standard-operator form."""
    try:
        require_fused_attention()
    except MissingDependencyError:
        return False
    return True


def _fused_attention(q, k, v, prompt_k, prompt_v):
    return torch.ops.clip_guard.prompt_attention(q, k, v, prompt_k, prompt_v)


class FoldedBlock(nn.Module):
    """One open_clip ResidualAttentionBlock whose prompt is folded into constant keys and values.

    It shares the block's (frozen) weights and adds only the two constant buffers.
    fused: compute the attention with the clip_guard C++ operator instead of
    concatenation + scaled_dot_product_attention (same result, no batch-expanded copies)."""

    def __init__(self, block: nn.Module, prompt: torch.Tensor, index: int = 0, fused: bool = False):
        super().__init__()
        _check_foldable(block, index)
        self.block = block
        self.fused = fused
        self.num_heads = block.attn.num_heads
        with torch.no_grad():
            _, prompt_k, prompt_v = self._project(block.ln_1(prompt.unsqueeze(0)))
        self.register_buffer("prompt_k", prompt_k[0].contiguous())
        self.register_buffer("prompt_v", prompt_v[0].contiguous())

    @property
    def num_prompts(self) -> int:
        return self.prompt_k.shape[1]

    def _project(self, normed: torch.Tensor):
        """[N, T, D] normalised tokens -> q, k, v as [N, H, T, d]."""
        attention = self.block.attn
        batch, length, width = normed.shape
        qkv = F.linear(normed, attention.in_proj_weight, attention.in_proj_bias)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        block = self.block
        q, k, v = self._project(block.ln_1(tokens))
        attend = _fused_attention if self.fused else attend_with_prompts
        mixed = attend(q, k, v, self.prompt_k.to(q.dtype), self.prompt_v.to(q.dtype))
        mixed = block.attn.out_proj(mixed.transpose(1, 2).reshape(tokens.shape))
        tokens = tokens + block.ls_1(mixed)
        return tokens + block.ls_2(block.mlp(block.ln_2(tokens)))


class FoldedCLIP(nn.Module):
    """The folded equivalent of a `PromptedCLIP`: same (logits, embedding) outputs."""

    def __init__(self, model: PromptedCLIP, fused: bool = False):
        super().__init__()
        encoder: PromptedVisionEncoder = model.encoder
        self.encoder = encoder
        prompts = model.prompts
        start = prompts.start_block if prompts is not None else encoder.num_blocks
        blocks = list(encoder.blocks[:start])
        for index in range(start, encoder.num_blocks):
            blocks.append(FoldedBlock(encoder.blocks[index], prompts.tokens[index - start].detach(), index, fused))
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("text_features", model.text_features.clone())
        self.logit_scale = model.logit_scale

    @property
    def fused(self) -> bool:
        return any(getattr(block, "fused", False) for block in self.blocks)

    @property
    def num_folded_blocks(self) -> int:
        return sum(isinstance(block, FoldedBlock) for block in self.blocks)

    def forward(self, images: torch.Tensor, frozen_rows: int = 0, class_token: bool = False) -> tuple:
        """Returns (logits [N, C], image embedding [N, E]), and with class_token the last
        block's class token [N, D] third. The last `frozen_rows` images run through the
        frozen tower: their tokens skip the prompts' keys and values, which is exactly the
        base model's attention (the alert's frozen-tower view)."""
        tokens = self.encoder.embed(images)
        for block in self.blocks:
            if frozen_rows and isinstance(block, FoldedBlock):  # (no len(images) here: export keeps N dynamic)
                tokens = torch.cat([block(tokens[:-frozen_rows]), block.block(tokens[-frozen_rows:])])
            else:
                tokens = block(tokens)
        embedding = self.encoder.head(tokens)
        return (class_logits(embedding, self.text_features, self.logit_scale), embedding) \
            + ((tokens[:, 0],) if class_token else ())


def fold(model: PromptedCLIP, fused: bool | None = False) -> FoldedCLIP:
    """The serving form of `model`, frozen and in eval mode.

    fused: use the clip_guard C++ attention operator; None uses it where it is
    measured faster and available: on the CPU when cpp_ext is built (docs/cpp_ext.md;
    its CUDA kernel has not been measured yet, so CUDA stays on standard operators)."""
    if fused is None:
        on_cpu = next(model.encoder.parameters()).device.type == "cpu"
        fused = on_cpu and fused_attention_available()
    elif fused:
        try:
            require_fused_attention()
        except MissingDependencyError as error:
            raise MissingDependencyError(f"fused=True needs the clip_guard C++ operator: {error}") from error
    folded = FoldedCLIP(model, fused).eval()
    folded.requires_grad_(False)
    return folded
