"""The text side: a frozen text tower that runs from token embeddings, CoOp-style
class-wise learnable context (what CBPT trains), and zero-shot class embeddings.

Like `guard.prompted`, this wraps open_clip model instances without importing or
copying open_clip: it calls the tower's own embedding, transformer and projection.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from guard.errors import InputError, ModelLoadError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CONTEXT_POSITIONS = ("end", "middle", "front")


class TextEncoder(nn.Module):
    """Frozen open_clip text tower, entered at the token-embedding level.

    `encode(token_embeddings, token_ids)` equals `clip.encode_text(token_ids)` when the
    embeddings are the tower's own token embeddings of `token_ids`; the ids only
    locate the pooled (end-of-text) position."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        tower = getattr(clip, "text", clip)  # CustomTextCLIP keeps its tower in .text
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(tower, name) for name in needed):
            raise ModelLoadError(f"{type(clip).__name__} has no open_clip text transformer "
                                 "(HF text towers are not supported)")
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ModelLoadError("text towers with a class token or a padding mask (CoCa-style) are not supported")
        self.tower = tower
        self.pool_type = getattr(tower, "pool_type", None) or getattr(clip, "text_pool_type", "argmax")
        self.eos_id = getattr(tower, "eos_id", None) or getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", getattr(clip, "attn_mask", None), persistent=False)
        for parameter in self.tower.parameters():
            parameter.requires_grad_(False)

    @property
    def context_length(self) -> int:
        return self.tower.positional_embedding.shape[0]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.tower.token_embedding(token_ids)

    def _pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":  # the end-of-text token has the highest id
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full_like(token_ids[:, 0], token_ids.shape[1] - 1)
        if self.pool_type == "first":
            return torch.zeros_like(token_ids[:, 0])
        raise ModelLoadError(f"unsupported text pool type {self.pool_type!r}")

    def encode(self, token_embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """[N, L, W] embeddings and [N, L] ids -> [N, E] text features (not normalised)."""
        cast_dtype = self.tower.transformer.get_cast_dtype()
        x = token_embeddings.to(cast_dtype) + self.tower.positional_embedding.to(cast_dtype)
        x = self.tower.transformer(x, attn_mask=self.attn_mask)
        x = self.tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self._pool_index(token_ids)]
        projection = self.tower.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_tokens(token_ids), token_ids)


class ClassContext(nn.Module):
    """Class-wise learnable context, CoOp-style: class j's prompt is
    [SOS, V_1^j .. V_M^j, class tokens, '.', EOS] for position 'end' (CBPT's default);
    'front' puts the class tokens first, 'middle' splits the context around them.

    Owns only the context vectors; the other token embeddings are frozen buffers.
    `init_words` (default "a photo of a") initialises every class's context when it
    tokenises to exactly M tokens, so the untrained prompt equals that template;
    otherwise the context starts from N(0, 0.02)."""

    def __init__(self, text_encoder: TextEncoder, tokenizer, class_names: Sequence[str],
                 num_context: int = 4, position: str = "end", init_words: str | None = "a photo of a"):
        super().__init__()
        if position not in CONTEXT_POSITIONS:
            raise InputError(f"context position must be one of {CONTEXT_POSITIONS}, got {position!r}")
        if num_context < 1:
            raise InputError(f"num_context must be at least 1, got {num_context}")
        if not class_names:
            raise InputError("class_names is empty")
        placeholder = tokenizer.encode("x")[0]
        period = tokenizer.encode(".")
        length = text_encoder.context_length
        ids = torch.zeros(len(class_names), length, dtype=torch.long)
        positions = torch.zeros(len(class_names), num_context, dtype=torch.long)
        half = num_context // 2
        before, after = {"end": (num_context, 0), "front": (0, num_context),
                         "middle": (half, num_context - half)}[position]  # context tokens around the name
        for row, name in enumerate(class_names):
            name_ids = tokenizer.encode(name)
            sequence = ([tokenizer.sot_token_id] + [placeholder] * before + name_ids
                        + [placeholder] * after + period + [tokenizer.eot_token_id])
            if len(sequence) > length:
                raise InputError(f"class name {name!r} with {num_context} context tokens needs "
                                 f"{len(sequence)} tokens; the text tower takes {length}")
            ids[row, :len(sequence)] = torch.tensor(sequence)
            slots = list(range(1, 1 + before)) + list(range(1 + before + len(name_ids),
                                                            1 + before + len(name_ids) + after))
            positions[row] = torch.tensor(slots)
        self.register_buffer("token_ids", ids)
        self.register_buffer("context_positions", positions)
        with torch.no_grad():
            self.register_buffer("frozen_embeddings", text_encoder.embed_tokens(ids).detach().clone())
        width = self.frozen_embeddings.shape[-1]
        context = torch.empty(len(class_names), num_context, width)
        init_ids = tokenizer.encode(init_words) if init_words else []
        if len(init_ids) == num_context:
            with torch.no_grad():
                words = text_encoder.embed_tokens(torch.tensor(init_ids, device=ids.device))
            context.copy_(words.unsqueeze(0).expand_as(context))
        else:
            nn.init.normal_(context, std=0.02)
        self.context = nn.Parameter(context)
        self.position = position

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [C, L, W] with the context in place, and the token ids [C, L]."""
        index = self.context_positions.unsqueeze(-1).expand(-1, -1, self.context.shape[-1])
        embeddings = self.frozen_embeddings.scatter(1, index, self.context.to(self.frozen_embeddings.dtype))
        return embeddings, self.token_ids


def class_text_features(text_encoder: TextEncoder, tokenizer, class_names: Sequence[str],
                        templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Zero-shot class embeddings [C, E]: per class, the normalised mean of the
    normalised embeddings of every template filled with the class name."""
    if not templates or any("{}" not in template for template in templates):
        raise InputError(f"every template needs a '{{}}' for the class name, got {list(templates)}")
    device = text_encoder.tower.positional_embedding.device
    features = []
    with torch.no_grad():
        for name in class_names:
            token_ids = tokenizer([template.format(name) for template in templates]).to(device)
            embedded = nn.functional.normalize(text_encoder(token_ids).float(), dim=-1)
            features.append(nn.functional.normalize(embedded.mean(dim=0), dim=-1))
    return torch.stack(features)
