"""CLIP text encoder config and input checks, shared by the torch and flax ``CLIPTextModel``s.

Config fields and defaults are transformers 5's ``CLIPTextConfig``; a ``config.json`` written by
transformers (``architectures``, ``model_type``, ``transformers_version``, ...) or by us is
completed and validated here once, so both backends build the same network from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_core.arrays import namespace

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
# transformers ``hidden_act`` names used by CLIP text configs (each backend binds them to functions).
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
# Generic transformers ``config.json`` keys that say nothing about this network.
GENERIC_CONFIG_KEYS = frozenset(
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


@dataclass(frozen=True)
class CLIPTextOutput:
    """``CLIPTextModel`` output (torch tensors or jax arrays); ``hidden_states`` is None unless requested."""

    last_hidden_state: Any  # (B, T, hidden), after final_layer_norm
    pooler_output: Any  # (B, hidden): last_hidden_state at the end-of-text token
    hidden_states: tuple[Any, ...] | None = None  # embeddings, then each layer (before final norm)


@dataclass(frozen=True)
class CLIPTextWithProjectionOutput:
    """``CLIPTextModelWithProjection`` output: the pooled state projected, plus the text-model outputs."""

    text_embeds: Any  # (B, projection_dim)
    last_hidden_state: Any  # (B, T, hidden)
    pooler_output: Any  # (B, hidden)
    hidden_states: tuple[Any, ...] | None = None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def clip_text_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Complete and check a ``CLIPTextConfig`` mapping; ``_``-prefixed and generic keys are dropped."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(config).__name__}")
    unknown = sorted(k for k in config if k not in CLIP_TEXT_DEFAULTS and k not in GENERIC_CONFIG_KEYS and k[:1] != "_")
    if unknown:
        warnings.warn(f"CLIP text config: ignoring unknown keys {unknown}", stacklevel=3)
    cfg = {k: config.get(k, default) for k, default in CLIP_TEXT_DEFAULTS.items()}
    for name in _POSITIVE_INTS:
        if not _is_positive_int(cfg[name]):
            raise ValueError(f"{name}: expected a positive int, got {cfg[name]!r}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(
            f"hidden_size: {cfg['hidden_size']} is not a multiple of num_attention_heads {cfg['num_attention_heads']}"
        )
    if cfg["hidden_act"] not in CLIP_ACTIVATIONS:
        raise ValueError(
            f"hidden_act: unsupported activation {cfg['hidden_act']!r}; accepted: {list(CLIP_ACTIVATIONS)}"
        )
    if isinstance(cfg["eos_token_id"], bool) or not isinstance(cfg["eos_token_id"], int):
        raise ValueError(f"eos_token_id: expected an int (it picks the pooled token), got {cfg['eos_token_id']!r}")
    dropout = cfg["attention_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"attention_dropout: expected a float in [0, 1), got {dropout!r}")
    return cfg


def check_projection_dim(cfg: Mapping[str, Any]) -> int:
    """``projection_dim`` of a completed config, checked (only the projection model uses it)."""
    if not _is_positive_int(cfg["projection_dim"]):
        raise ValueError(f"projection_dim: expected a positive int, got {cfg['projection_dim']!r}")
    return cfg["projection_dim"]


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is None:
        return type(value).__name__
    return f"shape {tuple(shape)} dtype {getattr(value, 'dtype', None)}"


def _is_integer_array(value: Any) -> bool:
    if getattr(value, "ndim", None) is None:
        return False
    try:
        return bool(namespace(value).isdtype(value.dtype, "integral"))
    except TypeError:  # not an array-API array
        return False


def check_text_inputs(
    input_ids: Any, attention_mask: Any, cfg: Mapping[str, Any], *, check_values: bool = True
) -> None:
    """Raise ValueError naming the argument for ids or masks a CLIP text model cannot encode.

    ``input_ids`` must be a (batch, sequence) integer array no longer than ``max_position_embeddings``
    (when the config has one);
    ``attention_mask`` None or of the same shape. Token ids are range-checked against ``vocab_size``
    only when ``check_values`` (not under ``jax.jit``, where values are unknown).
    """
    if not _is_integer_array(input_ids) or input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected a (batch, sequence) integer array, got {_describe(input_ids)}")
    batch, seq_len = (int(d) for d in input_ids.shape)
    limit = cfg.get("max_position_embeddings")  # None: relative positions (T5), any length
    if seq_len < 1 or (limit is not None and seq_len > limit):
        accepted = "at least 1" if limit is None else f"in [1, max_position_embeddings={limit}]"
        raise ValueError(f"input_ids: sequence length {seq_len} must be {accepted}")
    if check_values and batch:
        xp = namespace(input_ids)
        if int(xp.min(input_ids)) < 0 or int(xp.max(input_ids)) >= cfg["vocab_size"]:
            raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={cfg['vocab_size']})")
    if attention_mask is not None and tuple(getattr(attention_mask, "shape", ())) != (batch, seq_len):
        raise ValueError(f"attention_mask: expected shape {(batch, seq_len)}, got {_describe(attention_mask)}")
