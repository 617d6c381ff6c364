"""RVPT deep visual prompts around a frozen open_clip image tower.

The wrapped tower is an open_clip `VisionTransformer` instance; this module never
imports open_clip and never copies its code: it calls the tower's own embedding,
blocks and pooling, and only changes which tokens enter each block.

VPT-deep, as in RVPT: blocks before `start_block` run untouched. At the input of
every later block l its own prompt P_l (b tokens of width D) is inserted right
after the class token, and the previous block's prompt outputs are dropped; after
the last block the prompts are dropped and the class token is pooled as usual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import InputError, ModelLoadError


def insert_prompts(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[N, 1+T, D] tokens and [b, D] prompts -> [N, 1+b+T, D], prompts after the class token."""
    batch_prompts = prompts.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    return torch.cat([tokens[:, :1], batch_prompts, tokens[:, 1:]], dim=1)


def drop_prompts(tokens: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Inverse of `insert_prompts`: remove the b tokens that follow the class token."""
    return torch.cat([tokens[:, :1], tokens[:, 1 + num_prompts:]], dim=1)


class VisualPrompts(nn.Module):
    """The only trainable part of RVPT: `num_tokens` prompt tokens for each block
    from `start_block` to the last one, stored as one [blocks, tokens, width] tensor."""

    def __init__(self, num_blocks: int, width: int, start_block: int, num_tokens: int,
                 patch_size: int = 16):
        super().__init__()
        if not 0 <= start_block <= num_blocks:
            raise InputError(f"start_block must lie in [0, {num_blocks}], got {start_block}")
        if num_tokens < 1:
            raise InputError(f"num_tokens must be at least 1, got {num_tokens}")
        self.start_block = start_block
        self.tokens = nn.Parameter(torch.empty(num_blocks - start_block, num_tokens, width))
        # VPT's initialisation: uniform with the Xavier bound of a patch embedding.
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
        nn.init.uniform_(self.tokens, -bound, bound)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_prompted_blocks(self) -> int:
        return self.tokens.shape[0]


@dataclass
class VisionFeatures:
    """Output of the (prompted) image tower.

    embedding: [N, E] image embedding before normalisation (what meets the text).
    block_cls: [N, K, D] class token at the output of each of the K blocks from
        `start_block` on (the blocks whose class tokens the FR loss compares)."""
    embedding: torch.Tensor
    block_cls: torch.Tensor


class PromptedVisionEncoder(nn.Module):
    """A frozen open_clip ViT image tower that runs with or without `VisualPrompts`."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        missing = [name for name in ("conv1", "transformer", "_embeds", "_pool")
                   if not hasattr(visual, name)]
        if missing:
            raise ModelLoadError(
                f"visual prompts need an open_clip VisionTransformer image tower; "
                f"{type(visual).__name__} lacks {missing} (ResNet and timm towers are not supported)")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ModelLoadError("visual prompts need a tower that pools its class token (pool_type 'tok')")
        if not getattr(visual.transformer, "batch_first", True):
            raise ModelLoadError("the image tower's transformer must be batch-first (open_clip >= 2.23)")
        self.visual = visual
        for parameter in self.visual.parameters():
            parameter.requires_grad_(False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def patch_size(self) -> int:
        return self.visual.conv1.kernel_size[0]

    def new_prompts(self, start_block: int, num_tokens: int) -> VisualPrompts:
        return VisualPrompts(self.num_blocks, self.width, start_block, num_tokens, self.patch_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch, class and position embeddings after ln_pre: the input of block 0."""
        return self.visual._embeds(images)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int,
                   prompts: Optional[VisualPrompts] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks [start, stop). Returns the tokens and the class token after each block.

        Blocks at or after `prompts.start_block` get their prompt inserted; the prompt
        outputs are dropped right after the block, so the tokens returned never hold prompts."""
        class_tokens = []
        for index in range(start, stop):
            block = self.blocks[index]
            if prompts is not None and index >= prompts.start_block:
                prompt = prompts.tokens[index - prompts.start_block]
                tokens = drop_prompts(block(insert_prompts(tokens, prompt)), prompt.shape[0])
            else:
                tokens = block(tokens)
            class_tokens.append(tokens[:, 0])
        return tokens, class_tokens

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post, class-token pooling and projection, exactly as the tower does."""
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def forward(self, images: torch.Tensor, prompts: Optional[VisualPrompts] = None) -> VisionFeatures:
        tokens, class_tokens = self._run_all(images, prompts)
        return VisionFeatures(self.head(tokens), _stack_class_tokens(class_tokens, tokens))

    def last_tokens(self, images: torch.Tensor, prompts: Optional[VisualPrompts] = None) -> torch.Tensor:
        """[N, 1 + T, D] tokens at the output of the last block, before ln_post."""
        return self._run_all(images, prompts)[0]

    def final_class_token(self, images: torch.Tensor, prompts: Optional[VisualPrompts] = None) -> torch.Tensor:
        """[N, D] class token at the output of the last block, before ln_post (the input of
        the feature density, guard.density)."""
        return self.last_tokens(images, prompts)[:, 0]

    def _run_all(self, images: torch.Tensor, prompts: Optional[VisualPrompts]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last block's tokens and the class tokens of the prompted blocks."""
        start = prompts.start_block if prompts is not None else self.num_blocks
        tokens, _ = self.run_blocks(self.embed(images), 0, start)
        return self.run_blocks(tokens, start, self.num_blocks, prompts)

    def forward_with_reference(self, images: torch.Tensor, prompts: VisualPrompts
                               ) -> tuple[VisionFeatures, VisionFeatures]:
        """The prompted and the frozen (prompt-free) features of the same images.

        The first `start_block` blocks are identical in both, so they run once."""
        with torch.no_grad():
            shared, _ = self.run_blocks(self.embed(images), 0, prompts.start_block)
            frozen_tokens, frozen_cls = self.run_blocks(shared, prompts.start_block, self.num_blocks)
            frozen = VisionFeatures(self.head(frozen_tokens), _stack_class_tokens(frozen_cls, frozen_tokens))
        tokens, class_tokens = self.run_blocks(shared, prompts.start_block, self.num_blocks, prompts)
        prompted = VisionFeatures(self.head(tokens), _stack_class_tokens(class_tokens, tokens))
        return prompted, frozen


def _stack_class_tokens(class_tokens: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    if not class_tokens:
        return tokens.new_zeros(tokens.shape[0], 0, tokens.shape[-1])
    return torch.stack(class_tokens, dim=1)


def class_logits(embedding: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Scaled cosines between image embeddings [N, E] and normalised class embeddings [C, E]."""
    image = nn.functional.normalize(embedding.float(), dim=-1)
    return logit_scale * image @ text_features.float().T  # float32 even in a half-precision model


class PromptedCLIP(nn.Module):
    """Zero-shot classifier: prompted image tower against constant class text embeddings.

    text_features: [C, E] class embeddings (normalised here); logit_scale: the
    model's exp(logit_scale). Only `prompts` (when given) has trainable parameters."""

    def __init__(self, encoder: PromptedVisionEncoder, text_features: torch.Tensor,
                 logit_scale: float, prompts: Optional[VisualPrompts] = None):
        super().__init__()
        self.encoder = encoder
        self.prompts = prompts
        self.register_buffer("text_features", nn.functional.normalize(text_features.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        return class_logits(embedding, self.text_features, self.logit_scale)

    def forward(self, images: torch.Tensor, frozen_rows: int = 0, class_token: bool = False) -> tuple:
        """Returns (logits [N, C], image embedding [N, E]), and with class_token the last
        block's class token [N, D] (the feature density's input) third; the last
        `frozen_rows` images run through the frozen tower, without prompts (the alert's
        frozen-tower view)."""
        parts = [(images[:-frozen_rows], self.prompts), (images[-frozen_rows:], None)] if frozen_rows \
            else [(images, self.prompts)]
        tokens = torch.cat([self.encoder.last_tokens(part, prompts) for part, prompts in parts])
        embedding = self.encoder.head(tokens)
        return (self.logits(embedding), embedding) + ((tokens[:, 0],) if class_token else ())
