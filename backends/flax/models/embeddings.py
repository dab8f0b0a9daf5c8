"""Flax NNX ``add_embedding`` modules of UNet2DConditionModel (``addition_embed_type``), with diffusers' names.

``"text"`` (DeepFloyd IF): ``TextTimeEmbedding`` pools the encoder states into one vector with
``AttentionPooling`` (a mean-plus-position class token attending over itself and the tokens). ``"text_time"``
(SDXL): a ``TimestepEmbedding`` MLP of the pooled text embedding and sinusoidal features of the size/crop ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.flax.models.layers import TimestepEmbedding, layer_norm, linear
from diffusion_core.models import timestep_embedding
from diffusion_core.models.unet_condition_config import AdditionPlan, required_addition


class AttentionPooling(nnx.Module):
    """One class token (mean of the tokens + ``positional_embedding``) attending to [itself, tokens]."""

    def __init__(self, num_heads: int, embed_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        init = jax.random.normal(rngs.params(), (1, embed_dim), dtype) / embed_dim**0.5
        self.positional_embedding = nnx.Param(init)
        self.k_proj = linear(embed_dim, embed_dim, rngs, dtype)
        self.q_proj = linear(embed_dim, embed_dim, rngs, dtype)
        self.v_proj = linear(embed_dim, embed_dim, rngs, dtype)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, width = x.shape
        cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)  # (B, 1, C)
        tokens = jnp.concatenate([cls, x], axis=1)  # (B, 1 + S, C)
        q = self._split_heads(self.q_proj(cls))  # (B, heads, 1, head_dim)
        k = self._split_heads(self.k_proj(tokens))  # (B, heads, 1 + S, head_dim)
        v = self._split_heads(self.v_proj(tokens))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))  # on q and k each: steadier in float16
        scores = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k * scale)  # (B, heads, 1, 1 + S)
        weight = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", weight, v).reshape(batch, width)  # (B, C): heads concatenated

    def _split_heads(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, heads, T, head_dim)


class TextTimeEmbedding(nnx.Module):
    """``norm1`` (LayerNorm), ``pool`` (AttentionPooling), ``proj`` (Linear), ``norm2`` (LayerNorm)."""

    def __init__(
        self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ) -> None:
        self.norm1 = layer_norm(encoder_dim, rngs, dtype)
        self.pool = AttentionPooling(num_heads, encoder_dim, rngs=rngs, dtype=dtype)
        self.proj = linear(encoder_dim, time_embed_dim, rngs, dtype)
        self.norm2 = layer_norm(time_embed_dim, rngs, dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))  # (B, time_embed_dim)


def build_add_embedding(plan: AdditionPlan | None, rngs: nnx.Rngs, dtype: Any) -> nnx.Module | None:
    """The ``add_embedding`` module of an ``addition_embed_type`` (one branch per type), or None.

    "text_time"'s ``add_time_proj`` has no weights: its features are the core ``timestep_embedding``.
    """
    if plan is None:
        return None
    if plan.kind == "text":
        return TextTimeEmbedding(plan.in_dim, plan.embed_dim, plan.num_heads, rngs=rngs, dtype=dtype)
    if plan.kind == "text_time":
        return TimestepEmbedding(plan.in_dim, plan.embed_dim, rngs=rngs, dtype=dtype)
    raise ValueError(f"addition_embed_type: unsupported value {plan.kind!r}")


def embed_addition(
    module: nnx.Module | None,
    plan: AdditionPlan | None,
    encoder_hidden_states: jax.Array,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> Any:
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
            jnp.asarray(required_addition(added_cond_kwargs, n, plan.kind)) for n in ("text_embeds", "time_ids")
        )
        feats = timestep_embedding(time_ids.reshape(-1), plan.time_proj_dim, plan.flip_sin_to_cos, plan.freq_shift)
        time_embeds = feats.reshape(text_embeds.shape[0], -1)  # (B, n_ids * time_proj_dim) float32
        return module(jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], -1).astype(dtype or jnp.float32))
    raise ValueError(f"addition_embed_type: unsupported value {plan.kind!r}")
