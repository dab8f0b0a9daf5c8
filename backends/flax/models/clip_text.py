"""Flax NNX CLIP text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``), transformers 5 layout.

Same config, call and outputs as the PyTorch ones (``diffusion_core.torch.models.clip_text``);
attribute names mirror transformers 5 (``embeddings.token_embedding``, ``encoder.layers[i].self_attn.q_proj``,
``final_layer_norm``, ``text_model``, ``text_projection``), so ``diffusion_core.weights.convert``
maps its state dict mechanically. Call: ``model(input_ids, attention_mask=None,
output_hidden_states=False)`` with (B, T) integer ids and an optional (B, T) 0/1 padding mask;
works eagerly and under ``jax.jit``/``nnx.jit`` (token-id range checks run only eagerly).
Attention dropout (``attention_dropout > 0``) is active only after ``model.train()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models.layers import ParamKeys
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.models.clip_config import (
    CLIPTextOutput,
    CLIPTextWithProjectionOutput,
    check_projection_dim,
    check_text_inputs,
    clip_text_config,
)
from diffusion_core.models.text_pooling import eos_token_positions
from diffusion_core.weights.pretrained import CLIP_TEXT_LAYOUT, CLIP_TEXT_PROJECTION_LAYOUT, CheckpointLayout


def _quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers ``hidden_act`` names used by CLIP text configs (validated in clip_config).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# The shared output classes are pytrees here, so jitted functions can return them.
for _output in (CLIPTextOutput, CLIPTextWithProjectionOutput):
    jax.tree_util.register_dataclass(_output)


def _linear(in_f: int, out_f: int, rngs: nnx.Rngs, dtype: Any, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _layer_norm(cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    """LayerNorm equal to torch's: biased two-pass variance, ``eps`` inside the sqrt."""
    return nnx.LayerNorm(
        cfg["hidden_size"],
        epsilon=cfg["layer_norm_eps"],
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> None:
        width = cfg["hidden_size"]
        self.token_embedding = nnx.Embed(cfg["vocab_size"], width, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(
            cfg["max_position_embeddings"], width, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = self.position_embedding.embedding[: input_ids.shape[1]]  # (T, hidden)
        return self.token_embedding(input_ids) + positions[None].astype(self.token_embedding.dtype)  # (B, T, hidden)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> None:
        width = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.k_proj = _linear(width, width, rngs, dtype)
        self.v_proj = _linear(width, width, rngs, dtype)
        self.q_proj = _linear(width, width, rngs, dtype)
        self.out_proj = _linear(width, width, rngs, dtype)
        self.dropout = nnx.Dropout(cfg["attention_dropout"], deterministic=True, rngs=rngs.rngs)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``mask``: (B, 1, T, T) bool, True where a query may attend; None means plain causal."""
        batch, seq_len, width = hidden_states.shape
        q, k, v = (
            proj(hidden_states).reshape(batch, seq_len, self.num_heads, -1)  # (B, T, heads, head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        visible = None if mask is None else jnp.any(mask, axis=-1, keepdims=True)  # (B, 1, T, 1)
        full = None if mask is None else mask | ~visible  # no all-False row: no NaN
        if self.dropout.rate > 0 and not self.dropout.deterministic:
            out = self._attend_with_dropout(q, k, v, full)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=full, is_causal=mask is None)  # (B, T, heads, head_dim)
        if visible is not None:
            out = out * jnp.swapaxes(visible, 1, 2).astype(out.dtype)  # a query that sees no key gets zeros
        return self.out_proj(out.reshape(batch, seq_len, width))  # (B, T, hidden)

    def _attend_with_dropout(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Explicit softmax attention with dropout on the probabilities (training only)."""
        seq_len = q.shape[1]
        if mask is None:
            mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]  # (1, 1, T, T)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)  # (B, heads, T, T)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = self.dropout(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype))
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, T, heads, head_dim)


class CLIPMLP(nnx.Module):
    """Two-layer feed-forward block: fc1 -> activation -> fc2."""

    def __init__(self, cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> None:
        self.activation_fn = _ACTIVATIONS[cfg["hidden_act"]]
        self.fc1 = _linear(cfg["hidden_size"], cfg["intermediate_size"], rngs, dtype)
        self.fc2 = _linear(cfg["intermediate_size"], cfg["hidden_size"], rngs, dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> None:
        self.self_attn = CLIPAttention(cfg, rngs, dtype)
        self.layer_norm1 = _layer_norm(cfg, rngs, dtype)
        self.mlp = CLIPMLP(cfg, rngs, dtype)
        self.layer_norm2 = _layer_norm(cfg, rngs, dtype)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nnx.Module):
    """The stack of ``num_hidden_layers`` encoder layers."""

    def __init__(self, cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> None:
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs, dtype) for _ in range(cfg["num_hidden_layers"])])


def _attention_mask(attention_mask: jax.Array | None, seq_len: int) -> jax.Array | None:
    """Causal mask combined with a (B, T) key padding mask, as (B, 1, T, T) bool; None if no padding."""
    if attention_mask is None:
        return None
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))  # (T, T)
    return causal[None, None] & (jnp.asarray(attention_mask) != 0)[:, None, None, :]  # (B, 1, T, T)


class CLIPTextModel(PretrainedMixin, nnx.Module):
    """CLIP's causal text transformer (Radford et al. 2021) with transformers 5's names."""

    checkpoint_layout: ClassVar[CheckpointLayout] = CLIP_TEXT_LAYOUT

    def __init__(
        self, config: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32
    ) -> None:
        self.config = FrozenConfig(clip_text_config(config))
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(self.config, rngs, dtype)
        self.encoder = CLIPEncoder(self.config, rngs, dtype)
        self.final_layer_norm = _layer_norm(self.config, rngs, dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CLIPTextModel:
        """Build from a transformers ``config.json`` mapping (random weights); ``kwargs``: ``rngs``, ``dtype``."""
        return cls(config, **kwargs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encode (B, T) token ids; ``attention_mask`` (B, T) is 1 for real tokens, 0 for padding."""
        check_text_inputs(
            input_ids, attention_mask, self.config, check_values=not isinstance(input_ids, jax.core.Tracer)
        )
        input_ids = jnp.asarray(input_ids)
        mask = _attention_mask(attention_mask, input_ids.shape[1])
        hidden_states = self.embeddings(input_ids)  # (B, T, hidden)
        all_states = [hidden_states]
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, mask)
            all_states.append(hidden_states)
        last = self.final_layer_norm(hidden_states)  # (B, T, hidden)
        positions = eos_token_positions(input_ids, self.config["eos_token_id"])  # (B,)
        pooled = last[jnp.arange(last.shape[0]), positions]  # (B, hidden)
        return CLIPTextOutput(last, pooled, tuple(all_states) if output_hidden_states else None)


class CLIPTextModelWithProjection(PretrainedMixin, nnx.Module):
    """``CLIPTextModel`` plus a bias-free projection of the pooled state (``text_embeds``)."""

    checkpoint_layout: ClassVar[CheckpointLayout] = CLIP_TEXT_PROJECTION_LAYOUT

    def __init__(
        self, config: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32
    ) -> None:
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        self.text_model = CLIPTextModel(config, rngs=rngs, dtype=dtype)
        self.config = self.text_model.config
        self.dtype = dtype
        projection_dim = check_projection_dim(self.config)
        self.text_projection = _linear(self.config["hidden_size"], projection_dim, rngs, dtype, use_bias=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CLIPTextModelWithProjection:
        """Build from a transformers ``config.json`` mapping (random weights); ``kwargs``: ``rngs``, ``dtype``."""
        return cls(config, **kwargs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextWithProjectionOutput:
        """Encode (B, T) token ids and project the pooled state to (B, projection_dim)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextWithProjectionOutput(
            self.text_projection(out.pooler_output), out.last_hidden_state, out.pooler_output, out.hidden_states
        )


__all__ = [
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
]
