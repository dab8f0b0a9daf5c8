"""Flax NNX ``T5EncoderModel`` (Raffel et al. 2020), transformers 5 layout: DeepFloyd IF's text encoder.

Same config, call and output as the PyTorch one (``diffusion_core.torch.models.t5``); attribute names
mirror transformers 5 (``shared``, ``encoder.block[i].layer[0].SelfAttention.q``,
``encoder.block[i].layer[1].DenseReluDense.wo``, ``encoder.final_layer_norm``), so
``diffusion_core.weights.convert`` maps its state dict mechanically (RMS norm ``scale`` <-> ``weight``).
Call: ``model(input_ids, attention_mask=None)`` with (B, T) integer ids and an optional (B, T) 0/1
padding mask; returns ``T5EncoderOutput`` (``out[0]`` is ``out.last_hidden_state``). Works eagerly
and under ``jax.jit``/``nnx.jit`` (token-id range checks run only eagerly). Built in float16, the
``wo`` weights are float32 and the residual stream follows them, as in transformers.
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
from diffusion_core.models.clip_config import check_text_inputs
from diffusion_core.models.t5_config import (
    T5EncoderOutput,
    clamp_float16,
    relative_position_buckets,
    t5_encoder_config,
)
from diffusion_core.weights.pretrained import T5_ENCODER_LAYOUT, CheckpointLayout


def _gelu_new(x: jax.Array) -> jax.Array:
    """The tanh GELU approximation (transformers' ``gelu_new``)."""
    return 0.5 * x * (1.0 + jnp.tanh((2.0 / jnp.pi) ** 0.5 * (x + 0.044715 * x**3)))


# transformers ``ACT2FN`` names a T5 feed-forward may use (validated in t5_config).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _linear(in_f: int, out_f: int, rngs: ParamKeys, dtype: Any) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class T5LayerNorm(nnx.Module):
    """RMS norm without bias or mean subtraction; the mean square is taken in float32."""

    def __init__(self, width: int, eps: float, dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((width,), dtype))
        self.eps = eps

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(hidden_states.astype(jnp.float32)), axis=-1, keepdims=True)  # (B, T, 1)
        hidden_states = hidden_states * jax.lax.rsqrt(variance + self.eps)
        scale = self.scale[...]
        if scale.dtype in (jnp.float16, jnp.bfloat16):
            hidden_states = hidden_states.astype(scale.dtype)
        return scale * hidden_states


class T5Attention(nnx.Module):
    """Bias-free multi-head attention, unscaled scores plus a learned relative-position bias."""

    def __init__(self, cfg: Mapping[str, Any], has_bias: bool, rngs: ParamKeys, dtype: Any) -> None:
        self.num_heads, inner = cfg["num_heads"], cfg["num_heads"] * cfg["d_kv"]
        self.q = _linear(cfg["d_model"], inner, rngs, dtype)
        self.k = _linear(cfg["d_model"], inner, rngs, dtype)
        self.v = _linear(cfg["d_model"], inner, rngs, dtype)
        self.o = _linear(inner, cfg["d_model"], rngs, dtype)
        if has_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg["relative_attention_num_buckets"], cfg["num_heads"], dtype=dtype, param_dtype=dtype, rngs=rngs
            )

    def __call__(self, hidden_states: jax.Array, bias: jax.Array) -> jax.Array:
        """``bias``: (B or 1, heads, T, T) position bias, the padding mask folded in."""
        batch, seq_len, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).reshape(batch, seq_len, self.num_heads, -1)  # (B, T, heads, d_kv)
            for proj in (self.q, self.k, self.v)
        )
        out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0)  # (B, T, heads, d_kv)
        return self.o(out.reshape(batch, seq_len, -1))  # (B, T, d_model)


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention: x + attn(norm(x))."""

    def __init__(self, cfg: Mapping[str, Any], has_bias: bool, rngs: ParamKeys, dtype: Any) -> None:
        self.SelfAttention = T5Attention(cfg, has_bias, rngs, dtype)
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"], dtype)

    def __call__(self, hidden_states: jax.Array, bias: jax.Array) -> jax.Array:
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), bias)


def _wo_dtype(dtype: Any) -> Any:
    """The dtype of ``wo``: float32 when the model is float16 (the layout's keep-in-float32 rule)."""
    return jnp.dtype(T5_ENCODER_LAYOUT.weight_dtype("wo.weight", jnp.dtype(dtype).name))


class T5DenseActDense(nnx.Module):
    """Feed-forward wi -> act -> wo (original T5, ``feed_forward_proj="relu"``)."""

    def __init__(self, cfg: Mapping[str, Any], rngs: ParamKeys, dtype: Any) -> None:
        self.act = _ACTIVATIONS[cfg["dense_act_fn"]]
        self.wi = _linear(cfg["d_model"], cfg["d_ff"], rngs, dtype)
        self.wo = _linear(cfg["d_ff"], cfg["d_model"], rngs, _wo_dtype(dtype))

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.act(self.wi(hidden_states))
        return self.wo(hidden_states.astype(self.wo.kernel.dtype))


class T5DenseGatedActDense(nnx.Module):
    """Gated feed-forward act(wi_0 x) * wi_1 x -> wo (T5 v1.1, ``feed_forward_proj="gated-gelu"``)."""

    def __init__(self, cfg: Mapping[str, Any], rngs: ParamKeys, dtype: Any) -> None:
        self.act = _ACTIVATIONS[cfg["dense_act_fn"]]
        self.wi_0 = _linear(cfg["d_model"], cfg["d_ff"], rngs, dtype)
        self.wi_1 = _linear(cfg["d_model"], cfg["d_ff"], rngs, dtype)
        self.wo = _linear(cfg["d_ff"], cfg["d_model"], rngs, _wo_dtype(dtype))

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)  # (B, T, d_ff)
        return self.wo(hidden_states.astype(self.wo.kernel.dtype))


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward: x + ff(norm(x))."""

    def __init__(self, cfg: Mapping[str, Any], rngs: ParamKeys, dtype: Any) -> None:
        dense = T5DenseGatedActDense if cfg["is_gated_act"] else T5DenseActDense
        self.DenseReluDense = dense(cfg, rngs, dtype)
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"], dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Block(nnx.Module):
    """One encoder block: ``layer[0]`` self-attention, ``layer[1]`` feed-forward."""

    def __init__(self, cfg: Mapping[str, Any], has_bias: bool, rngs: ParamKeys, dtype: Any) -> None:
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_bias, rngs, dtype), T5LayerFF(cfg, rngs, dtype)])

    def __call__(self, hidden_states: jax.Array, bias: jax.Array) -> jax.Array:
        hidden_states = self.layer[0](hidden_states, bias)
        if hidden_states.dtype == jnp.float16:  # as the reference: keep float16 activations finite
            hidden_states = clamp_float16(hidden_states)
        hidden_states = self.layer[1](hidden_states)
        return clamp_float16(hidden_states) if hidden_states.dtype == jnp.float16 else hidden_states


class T5Stack(nnx.Module):
    """The encoder stack: blocks (the first holds the relative position bias) and a final RMS norm."""

    def __init__(self, cfg: Mapping[str, Any], rngs: ParamKeys, dtype: Any) -> None:
        self.block = nnx.List([T5Block(cfg, i == 0, rngs, dtype) for i in range(cfg["num_layers"])])
        self.final_layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"], dtype)


class T5EncoderModel(PretrainedMixin, nnx.Module):
    """T5's bidirectional text encoder with transformers 5's names (``shared`` + ``encoder``)."""

    checkpoint_layout: ClassVar[CheckpointLayout] = T5_ENCODER_LAYOUT

    def __init__(
        self, config: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32
    ) -> None:
        self.config = FrozenConfig(t5_encoder_config(config))
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        self.dtype = dtype
        cfg = self.config
        self.shared = nnx.Embed(cfg["vocab_size"], cfg["d_model"], dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, rngs, dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> T5EncoderModel:
        """Build from a transformers ``config.json`` mapping (random weights); ``kwargs``: ``rngs``, ``dtype``."""
        return cls(config, **kwargs)

    def _position_bias(self, attention_mask: jax.Array | None, seq_len: int, dtype: Any) -> jax.Array:
        """(B or 1, heads, T, T) relative position bias; padded keys get the dtype's lowest value."""
        cfg = self.config
        buckets = relative_position_buckets(
            seq_len, seq_len, cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"]
        )  # (T, T), a host constant
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # (1, heads, T, T)
        if attention_mask is None:
            return bias
        keep = (jnp.asarray(attention_mask) != 0)[:, None, None, :]  # (B, 1, 1, T)
        return jnp.where(keep, bias, jnp.finfo(dtype).min)  # (B, heads, T, T)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        """Encode (B, T) token ids; ``attention_mask`` (B, T) is 1 for real tokens, 0 for padding."""
        check_text_inputs(
            input_ids, attention_mask, self.config, check_values=not isinstance(input_ids, jax.core.Tracer)
        )
        hidden_states = self.shared(jnp.asarray(input_ids))  # (B, T, d_model)
        bias = self._position_bias(attention_mask, input_ids.shape[1], hidden_states.dtype)
        for block in self.encoder.block:
            hidden_states = block(hidden_states, bias)
        return T5EncoderOutput(self.encoder.final_layer_norm(hidden_states))


__all__ = ["T5EncoderModel", "T5EncoderOutput"]
