"""PyTorch ``addition_embed_type`` embeddings of UNet2DConditionModel (SDXL's ``"text_time"``), one branch per type.

The choice and its widths are resolved in ``diffusion_core.models.unet_condition_config.addition_plan``; module
names (``add_time_proj``, ``add_embedding``) are diffusers', so its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_core.models import unet_condition_config as ucc
from diffusion_core.torch.models.layers import TimestepEmbedding, Timesteps


def build_addition_embedding(owner: nn.Module, addition: ucc.AdditionPlan | None) -> None:
    """Register the addition embedding's modules on ``owner`` (nothing when ``addition`` is None)."""
    if addition is None:
        return
    if addition.kind == "text_time":
        owner.add_time_proj = Timesteps(addition.time_proj_dim, addition.flip_sin_to_cos, addition.freq_shift)
        owner.add_embedding = TimestepEmbedding(addition.in_dim, addition.embed_dim)
        return
    raise ValueError(f"addition_embed_type: unsupported value {addition.kind!r}")


def _required(added_cond_kwargs: Mapping[str, Any] | None, name: str, kind: str) -> torch.Tensor:
    if not added_cond_kwargs or added_cond_kwargs.get(name) is None:
        raise ValueError(f"added_cond_kwargs: {name!r} is required by addition_embed_type={kind!r}")
    return added_cond_kwargs[name]


def embed_addition(
    owner: nn.Module,
    addition: ucc.AdditionPlan | None,
    added_cond_kwargs: Mapping[str, Any] | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The (B, temb) embedding added to the time embedding, or None for a model without one."""
    if addition is None:
        if added_cond_kwargs:
            raise ValueError("added_cond_kwargs: this model has no addition_embed_type; pass None")
        return None
    text_embeds = _required(added_cond_kwargs, "text_embeds", addition.kind)  # (B, D_text)
    time_ids = _required(added_cond_kwargs, "time_ids", addition.kind)  # (B, n_ids)
    time_embeds = owner.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, n_ids * dim)
    return owner.add_embedding(torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1).to(dtype))
