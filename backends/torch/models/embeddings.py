"""PyTorch ``add_embedding`` modules of UNet2DConditionModel (``addition_embed_type``), with diffusers' names.

``"text"`` (DeepFloyd IF): ``TextTimeEmbedding`` pools the encoder states into one vector with
``AttentionPooling`` (a mean-plus-position class token attending over itself and the tokens). ``"text_time"``
(SDXL): a ``TimestepEmbedding`` MLP of the pooled text embedding and sinusoidal features of the size/crop ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_core.models import timestep_embedding
from diffusion_core.models.unet_condition_config import AdditionPlan, required_addition
from diffusion_core.torch.models.layers import TimestepEmbedding


class AttentionPooling(nn.Module):
    """One class token (mean of the tokens + ``positional_embedding``) attending to [itself, tokens]."""

    def __init__(self, num_heads: int, embed_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, width = x.shape
        cls = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, C)
        tokens = torch.cat([cls, x], dim=1)  # (B, 1 + S, C)
        q = self._split_heads(self.q_proj(cls))  # (B, heads, 1, head_dim)
        k = self._split_heads(self.k_proj(tokens))  # (B, heads, 1 + S, head_dim)
        v = self._split_heads(self.v_proj(tokens))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))  # on q and k each: steadier in float16
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-1, -2)).float(), dim=-1).to(q.dtype)
        return (weight @ v).reshape(batch, width)  # (B, C): heads concatenated

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)


class TextTimeEmbedding(nn.Module):
    """``norm1`` (LayerNorm), ``pool`` (AttentionPooling), ``proj`` (Linear), ``norm2`` (LayerNorm)."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))  # (B, time_embed_dim)


def build_add_embedding(plan: AdditionPlan | None) -> nn.Module | None:
    """The ``add_embedding`` module of an ``addition_embed_type`` (one branch per type), or None.

    "text_time"'s ``add_time_proj`` has no weights: its features are the core ``timestep_embedding``.
    """
    if plan is None:
        return None
    if plan.kind == "text":
        return TextTimeEmbedding(plan.in_dim, plan.embed_dim, num_heads=plan.num_heads)
    if plan.kind == "text_time":
        return TimestepEmbedding(plan.in_dim, plan.embed_dim)
    raise ValueError(f"addition_embed_type: unsupported value {plan.kind!r}")


def embed_addition(
    module: nn.Module | None,
    plan: AdditionPlan | None,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """The (B, time_embed_dim) addition to the time embedding for this call, or None without one.

    "text" embeds the encoder states as given, before ``encoder_hid_proj`` (as diffusers); "text_time" embeds
    ``cat([text_embeds, add_time_proj(time_ids).reshape(B, -1)])`` from ``added_cond_kwargs``, cast to ``dtype``.
    """
    if plan is None:
        if added_cond_kwargs:
            raise ValueError("added_cond_kwargs: this model has no addition_embed_type; pass None")
        return None
    if plan.kind == "text":
        return module(encoder_hidden_states)
    if plan.kind == "text_time":
        text_embeds, time_ids = (
            required_addition(added_cond_kwargs, n, plan.kind) for n in ("text_embeds", "time_ids")
        )
        feats = timestep_embedding(time_ids.flatten(), plan.time_proj_dim, plan.flip_sin_to_cos, plan.freq_shift)
        time_embeds = feats.reshape(text_embeds.shape[0], -1).to(text_embeds.dtype)  # (B, n_ids * time_proj_dim)
        return module(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype or text_embeds.dtype))
    raise ValueError(f"addition_embed_type: unsupported value {plan.kind!r}")
