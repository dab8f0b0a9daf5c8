"""PyTorch CLIP text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``), transformers 5 layout.

Config fields are those of transformers 5's ``CLIPTextConfig``; module names and state-dict
keys mirror transformers 5.x in memory, so its state dict loads with ``strict=True``:
``CLIPTextModel`` holds ``embeddings.*``, ``encoder.layers.{i}.*`` and ``final_layer_norm.*``
(no ``text_model.`` prefix; Hub checkpoints written by transformers 4 carry one, which the
loader strips); ``CLIPTextModelWithProjection`` holds ``text_model.*`` and
``text_projection.weight``. ``position_ids`` is not in the state dict (transformers keeps it
as a non-persistent buffer). Call: ``model(input_ids, attention_mask=None,
output_hidden_states=False)`` with (B, T) integer ids and an optional (B, T) 0/1 padding mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.models.text_pooling import eos_token_positions

# transformers 5 ``CLIPTextConfig`` fields and defaults (openai/clip-vit-base-patch32).
CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,  # kept for round trips; weights come from checkpoints
    "initializer_factor": 1.0,  # idem
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,  # picks the pooled token; 2 means the legacy argmax rule
}
# Generic transformers ``config.json`` keys that say nothing about this network.
_GENERIC_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "dropout",
        "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
        "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings",
    }
)  # fmt: skip
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings",
)  # fmt: skip


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


# transformers ``hidden_act`` names used by CLIP text configs.
_ACTIVATIONS: dict[str, Any] = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
}


def clip_text_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Complete and check a ``CLIPTextConfig`` mapping; ``_``-prefixed and generic keys are dropped."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(config).__name__}")
    unknown = sorted(k for k in config if k not in CLIP_TEXT_DEFAULTS and k not in _GENERIC_KEYS and k[:1] != "_")
    if unknown:
        warnings.warn(f"CLIP text config: ignoring unknown keys {unknown}", stacklevel=3)
    cfg = {k: config.get(k, default) for k, default in CLIP_TEXT_DEFAULTS.items()}
    for name in _POSITIVE_INTS:
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] <= 0:
            raise ValueError(f"{name}: expected a positive int, got {cfg[name]!r}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(
            f"hidden_size: {cfg['hidden_size']} is not a multiple of num_attention_heads {cfg['num_attention_heads']}"
        )
    if cfg["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"hidden_act: unsupported activation {cfg['hidden_act']!r}; accepted: {sorted(_ACTIVATIONS)}")
    if isinstance(cfg["eos_token_id"], bool) or not isinstance(cfg["eos_token_id"], int):
        raise ValueError(f"eos_token_id: expected an int (it picks the pooled token), got {cfg['eos_token_id']!r}")
    return cfg


@dataclass(frozen=True)
class CLIPTextOutput:
    """``CLIPTextModel`` output; ``hidden_states`` is None unless requested."""

    last_hidden_state: torch.Tensor  # (B, T, hidden), after final_layer_norm
    pooler_output: torch.Tensor  # (B, hidden): last_hidden_state at the end-of-text token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer (before final norm)


@dataclass(frozen=True)
class CLIPTextWithProjectionOutput:
    """``CLIPTextModelWithProjection`` output: the pooled state projected, plus the text-model outputs."""

    text_embeds: torch.Tensor  # (B, projection_dim)
    last_hidden_state: torch.Tensor  # (B, T, hidden)
    pooler_output: torch.Tensor  # (B, hidden)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embedding = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # (B, T, hidden)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        width = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.dropout = float(cfg["attention_dropout"])
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        return x.view(b, t, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask``: (B, 1, T, T) bool, True where a query may attend; None means plain causal."""
        q = self._split_heads(self.q_proj(hidden_states))
        k = self._split_heads(self.k_proj(hidden_states))
        v = self._split_heads(self.v_proj(hidden_states))
        visible = None if mask is None else mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask | ~visible,  # no all-False row: no NaN on any kernel
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
        )  # (B, heads, T, head_dim)
        if visible is not None:
            out = out * visible  # a query that sees no key attends to nothing: zeros, as the reference
        out = out.transpose(1, 2).reshape(hidden_states.shape)  # (B, T, hidden)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """Two-layer feed-forward block: fc1 -> activation -> fc2."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.activation_fn = _ACTIVATIONS[cfg["hidden_act"]]()
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    """The stack of ``num_hidden_layers`` encoder layers."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])


def _attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Causal mask combined with a (B, T) key padding mask, as (B, 1, T, T) bool; None if no padding.

    With left padding, a padding query before the first real token sees no key at all.
    """
    if attention_mask is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)


class CLIPTextModel(nn.Module):
    """CLIP's causal text transformer (Radford et al. 2021) with transformers 5's names."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config: dict[str, Any] = clip_text_config(config)
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config)
        self.final_layer_norm = nn.LayerNorm(self.config["hidden_size"], eps=self.config["layer_norm_eps"])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CLIPTextModel:
        """Build from a transformers ``config.json`` mapping (random weights)."""
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encode (B, T) token ids; ``attention_mask`` (B, T) is 1 for real tokens, 0 for padding."""
        self._check_inputs(input_ids, attention_mask)
        mask = _attention_mask(attention_mask, input_ids.shape[1])
        hidden_states = self.embeddings(input_ids)  # (B, T, hidden)
        all_states = [hidden_states]
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, mask)
            all_states.append(hidden_states)
        last = self.final_layer_norm(hidden_states)  # (B, T, hidden)
        positions = eos_token_positions(input_ids, self.config["eos_token_id"])  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), positions]  # (B, hidden)
        return CLIPTextOutput(last, pooled, tuple(all_states) if output_hidden_states else None)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raise ValueError naming the argument for ids or masks this model cannot encode."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected a (batch, sequence) integer tensor, got {_describe(input_ids)}")
        batch, seq_len = input_ids.shape
        limit = self.config["max_position_embeddings"]
        if not 0 < seq_len <= limit:
            raise ValueError(f"input_ids: sequence length {seq_len} must be in [1, max_position_embeddings={limit}]")
        if batch and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config["vocab_size"]):
            raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={self.config['vocab_size']})")
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq_len)
        ):
            raise ValueError(f"attention_mask: expected shape {(batch, seq_len)}, got {_describe(attention_mask)}")


class CLIPTextModelWithProjection(nn.Module):
    """``CLIPTextModel`` plus a bias-free projection of the pooled state (``text_embeds``)."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.text_model = CLIPTextModel(config)
        self.config: dict[str, Any] = self.text_model.config
        projection_dim = self.config["projection_dim"]
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
            raise ValueError(f"projection_dim: expected a positive int, got {projection_dim!r}")
        self.text_projection = nn.Linear(self.config["hidden_size"], projection_dim, bias=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CLIPTextModelWithProjection:
        """Build from a transformers ``config.json`` mapping (random weights)."""
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextWithProjectionOutput:
        """Encode (B, T) token ids and project the pooled state to (B, projection_dim)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextWithProjectionOutput(
            self.text_projection(out.pooler_output), out.last_hidden_state, out.pooler_output, out.hidden_states
        )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__


__all__ = [
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
    "clip_text_config",
]
