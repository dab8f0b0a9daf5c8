"""PyTorch CLIP text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``), transformers 5 layout.

Config fields are those of transformers 5's ``CLIPTextConfig``; module names and state-dict
keys mirror transformers 5.x in memory, so its state dict loads with ``strict=True``:
``CLIPTextModel`` holds ``embeddings.*``, ``encoder.layers.{i}.*`` and ``final_layer_norm.*``
(no ``text_model.`` prefix; Hub checkpoints written by transformers 4 carry one, which the
loader strips); ``CLIPTextModelWithProjection`` holds ``text_model.*`` and
``text_projection.weight``. ``position_ids`` is not in the state dict (transformers keeps it
as a non-persistent buffer). Call: ``model(input_ids, attention_mask=None,
output_hidden_states=False)`` with (B, T) integer ids and an optional (B, T) 0/1 padding mask.
``from_pretrained``/``save_pretrained`` read and write transformers' folder layout
(``config.json`` + ``model.safetensors``; see ``diffusion_core.weights.pretrained.CLIP_TEXT_LAYOUT``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models.clip_config import (
    CLIPTextOutput,
    CLIPTextWithProjectionOutput,
    check_projection_dim,
    check_text_inputs,
    clip_text_config,
)
from diffusion_core.models.text_pooling import eos_token_positions
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.weights.pretrained import CLIP_TEXT_LAYOUT, CLIP_TEXT_PROJECTION_LAYOUT, CheckpointLayout


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


class CLIPTextModel(PretrainedMixin, nn.Module):
    """CLIP's causal text transformer (Radford et al. 2021) with transformers 5's names."""

    checkpoint_layout: ClassVar[CheckpointLayout] = CLIP_TEXT_LAYOUT

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = FrozenConfig(clip_text_config(config))
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
        check_text_inputs(input_ids, attention_mask, self.config)
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


class CLIPTextModelWithProjection(PretrainedMixin, nn.Module):
    """``CLIPTextModel`` plus a bias-free projection of the pooled state (``text_embeds``)."""

    checkpoint_layout: ClassVar[CheckpointLayout] = CLIP_TEXT_PROJECTION_LAYOUT

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.text_model = CLIPTextModel(config)
        self.config = self.text_model.config
        projection_dim = check_projection_dim(self.config)
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


__all__ = [
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
    "clip_text_config",
]
