"""PyTorch ``T5EncoderModel`` (Raffel et al. 2020), transformers 5 layout: DeepFloyd IF's text encoder.

Config fields are those of transformers 5's ``T5Config`` (see ``diffusion_core.models.t5_config``);
module names and state-dict keys mirror transformers 5, so its checkpoints load strictly:
``shared.weight`` (the token embedding, tied to ``encoder.embed_tokens``, which the loader maps onto
it), ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`` (block 0 also holds
``relative_attention_bias``), ``encoder.block.{i}.layer.1.DenseReluDense.{wi | wi_0, wi_1, wo}``, the
RMS norms ``...layer_norm.weight`` and ``encoder.final_layer_norm.weight``. Call:
``model(input_ids, attention_mask=None)`` with (B, T) integer ids and an optional (B, T) 0/1 padding
mask; returns ``T5EncoderOutput`` (``out.last_hidden_state`` is ``out[0]``). Loaded in float16, the
``wo`` weights stay float32 and the residual stream follows them, as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models.clip_config import check_text_inputs
from diffusion_core.models.t5_config import (
    T5EncoderOutput,
    clamp_float16,
    relative_position_buckets,
    t5_encoder_config,
)
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.weights.pretrained import T5_ENCODER_LAYOUT, CheckpointLayout


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU approximation (transformers' ``gelu_new``), written out as the reference does."""
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers ``ACT2FN`` names a T5 feed-forward may use (validated in t5_config).
_ACTIVATIONS: dict[str, Any] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction; the mean square is taken in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class T5Attention(nn.Module):
    """Bias-free multi-head attention, unscaled scores plus a learned relative-position bias."""

    def __init__(self, cfg: Mapping[str, Any], has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.num_heads, inner = cfg["num_heads"], cfg["num_heads"] * cfg["d_kv"]
        self.q = nn.Linear(cfg["d_model"], inner, bias=False)
        self.k = nn.Linear(cfg["d_model"], inner, bias=False)
        self.v = nn.Linear(cfg["d_model"], inner, bias=False)
        self.o = nn.Linear(inner, cfg["d_model"], bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg["relative_attention_num_buckets"], cfg["num_heads"])

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias``: (B or 1, heads, T, T) position bias, the padding mask folded in."""
        b, t, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, d_kv)
            for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, heads, T, d_kv)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, d_model)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention: x + attn(norm(x))."""

    def __init__(self, cfg: Mapping[str, Any], has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), bias)


class T5DenseActDense(nn.Module):
    """Feed-forward wi -> act -> wo (original T5, ``feed_forward_proj="relu"``)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg["dense_act_fn"]]
        self.wi = nn.Linear(cfg["d_model"], cfg["d_ff"], bias=False)
        self.wo = nn.Linear(cfg["d_ff"], cfg["d_model"], bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(self.wi(hidden_states))
        return self.wo(hidden_states.to(self.wo.weight.dtype))  # wo may be kept float32


class T5DenseGatedActDense(nn.Module):
    """Gated feed-forward act(wi_0 x) * wi_1 x -> wo (T5 v1.1, ``feed_forward_proj="gated-gelu"``)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg["dense_act_fn"]]
        self.wi_0 = nn.Linear(cfg["d_model"], cfg["d_ff"], bias=False)
        self.wi_1 = nn.Linear(cfg["d_model"], cfg["d_ff"], bias=False)
        self.wo = nn.Linear(cfg["d_ff"], cfg["d_model"], bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)  # (B, T, d_ff)
        return self.wo(hidden_states.to(self.wo.weight.dtype))  # wo may be kept float32


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward: x + ff(norm(x))."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg["is_gated_act"] else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Block(nn.Module):
    """One encoder block: ``layer[0]`` self-attention, ``layer[1]`` feed-forward."""

    def __init__(self, cfg: Mapping[str, Any], has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer[0](hidden_states, bias)
        if hidden_states.dtype == torch.float16:  # as the reference: keep float16 activations finite
            hidden_states = clamp_float16(hidden_states)
        hidden_states = self.layer[1](hidden_states)
        return clamp_float16(hidden_states) if hidden_states.dtype == torch.float16 else hidden_states


class T5Stack(nn.Module):
    """The encoder stack: blocks (the first computes the relative position bias) and a final RMS norm."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg["num_layers"])])
        self.final_layer_norm = T5LayerNorm(cfg["d_model"], cfg["layer_norm_epsilon"])


class T5EncoderModel(PretrainedMixin, nn.Module):
    """T5's bidirectional text encoder with transformers 5's names (``shared`` + ``encoder``)."""

    checkpoint_layout: ClassVar[CheckpointLayout] = T5_ENCODER_LAYOUT

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = FrozenConfig(t5_encoder_config(config))
        self.shared = nn.Embedding(self.config["vocab_size"], self.config["d_model"])
        self.encoder = T5Stack(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> T5EncoderModel:
        """Build from a transformers ``config.json`` mapping (random weights)."""
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def _position_bias(self, attention_mask: torch.Tensor | None, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
        """(B or 1, heads, T, T) relative position bias; padded keys get the dtype's lowest value."""
        cfg = self.config
        buckets = relative_position_buckets(
            seq_len, seq_len, cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"]
        )  # (T, T)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        index = torch.from_numpy(buckets).to(device=table.weight.device, dtype=torch.long)
        bias = table(index).permute(2, 0, 1)[None]  # (1, heads, T, T)
        if attention_mask is None:
            return bias
        keep = attention_mask.to(device=bias.device).bool()[:, None, None, :]  # (B, 1, 1, T)
        return torch.where(keep, bias, torch.finfo(dtype).min)  # (B, heads, T, T)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> T5EncoderOutput:
        """Encode (B, T) token ids; ``attention_mask`` (B, T) is 1 for real tokens, 0 for padding."""
        check_text_inputs(input_ids, attention_mask, self.config)
        hidden_states = self.shared(input_ids)  # (B, T, d_model)
        bias = self._position_bias(attention_mask, input_ids.shape[1], hidden_states.dtype)
        for block in self.encoder.block:
            hidden_states = block(hidden_states, bias)
        return T5EncoderOutput(self.encoder.final_layer_norm(hidden_states))


__all__ = ["T5EncoderModel", "T5EncoderOutput"]
