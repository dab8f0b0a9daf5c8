"""T5 encoder config, relative-position buckets and outputs, shared by the torch and flax ``T5EncoderModel``s.

Config fields and defaults are transformers 5's ``T5Config`` (google-t5/t5-small); a ``config.json``
written by transformers (``architectures``, ``dense_act_fn``, ``is_gated_act``, ...) or by us is
completed and validated here once, so both backends build the same network from it. The
relative-attention bucket table (Raffel et al. 2020, sec. 2.1; Mesh TensorFlow's
``_relative_position_bucket``) depends only on sequence lengths, so it is computed here on the host
with numpy and handed to either backend as a constant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from diffusion_core.arrays import namespace
from diffusion_core.models.clip_config import GENERIC_CONFIG_KEYS

# transformers 5 ``T5Config`` fields and defaults (google-t5/t5-small).
T5_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,  # width of the residual stream
    "d_kv": 64,  # width of one attention head (d_model need not equal num_heads * d_kv)
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,  # kept for round trips; this is an encoder
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,  # kept for round trips; inference runs without dropout
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,  # kept for round trips; weights come from checkpoints
    "feed_forward_proj": "relu",  # "relu" (T5) or "gated-gelu" (T5 v1.1, DeepFloyd IF)
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "classifier_dropout": 0.0,
    "is_decoder": False,
}
# Keys transformers derives from the fields above and writes to config.json.
_DERIVED_KEYS = ("dense_act_fn", "is_gated_act", "scale_decoder_outputs")
# Keys of published T5 configs (t5-v1_1-xxl as DeepFloyd IF ships it, t5-small) that say nothing about the
# encoder; kept as given so a save writes them back, as transformers does.
_PASSED_THROUGH = ("decoder_start_token_id", "output_past", "n_positions", "task_specific_params", "bos_token_id")
# transformers ``ACT2FN`` names a T5 feed-forward may use (each backend binds them to functions).
T5_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
_POSITIVE_INTS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance",
)  # fmt: skip


class T5EncoderOutput(NamedTuple):
    """``T5EncoderModel`` output (torch tensor or jax array); ``out[0]`` is ``out.last_hidden_state``."""

    last_hidden_state: Any  # (B, T, d_model), after the final RMS norm


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _activation(feed_forward_proj: Any) -> tuple[str, bool]:
    """``(dense_act_fn, is_gated_act)`` from ``feed_forward_proj`` ("relu", "gated-gelu", ...), as transformers."""
    parts = feed_forward_proj.split("-") if isinstance(feed_forward_proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(
            f"feed_forward_proj: expected 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu'), got {feed_forward_proj!r}"
        )
    gated = len(parts) == 2
    return ("gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]), gated


def t5_encoder_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Complete and check a ``T5Config`` mapping for an encoder, with transformers' derived keys; generic keys
    are dropped."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(config).__name__}")
    known = set(T5_DEFAULTS) | set(_DERIVED_KEYS) | set(_PASSED_THROUGH) | GENERIC_CONFIG_KEYS
    unknown = sorted(k for k in config if k not in known and k[:1] != "_")
    if unknown:
        warnings.warn(f"T5 config: ignoring unknown keys {unknown}", stacklevel=3)
    cfg = {k: config.get(k, default) for k, default in T5_DEFAULTS.items()}
    cfg.update((k, config[k]) for k in _PASSED_THROUGH if k in config)
    for name in _POSITIVE_INTS:
        if not _is_positive_int(cfg[name]):
            raise ValueError(f"{name}: expected a positive int, got {cfg[name]!r}")
    if cfg["num_decoder_layers"] is None:
        cfg["num_decoder_layers"] = cfg["num_layers"]
    act, gated = _activation(cfg["feed_forward_proj"])
    act = config.get("dense_act_fn", act)  # an explicit dense_act_fn wins, as in transformers
    if act not in T5_ACTIVATIONS:
        raise ValueError(f"dense_act_fn: unsupported activation {act!r}; accepted: {list(T5_ACTIVATIONS)}")
    eps = cfg["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm_epsilon: expected a positive float, got {eps!r}")
    cfg.update(dense_act_fn=act, is_gated_act=gated, scale_decoder_outputs=True, tie_word_embeddings=True)
    cfg.update(use_cache=False, is_encoder_decoder=False)  # as transformers' T5EncoderModel sets (and saves) them
    return cfg


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """(query_length, key_length) int32 bucket of ``key_position - query_position``.

    Half the buckets (per direction when ``bidirectional``) count exact offsets below
    ``num_buckets // 2``; the rest grow logarithmically up to ``max_distance``, beyond which all
    offsets share the last bucket. The logarithm is taken in float32, as the PyTorch reference does,
    so truncation lands on the same integers.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # (Tq, Tk)
    buckets = np.zeros(relative.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) for the exact (small) offsets, discarded by the where
        scaled = np.log(relative.astype(np.float32) / np.float32(max_exact)) / np.float32(
            math.log(max_distance / max_exact)
        )
        large = max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


def clamp_float16(hidden_states: Any) -> Any:
    """A float16 residual stream clamped to the float16 range (1000 below it once an inf occurred), as
    transformers' T5 does after each sub-layer so float16 activations stay finite (numpy, torch or jax)."""
    xp = namespace(hidden_states)
    shrink = xp.astype(xp.any(xp.isinf(hidden_states)), hidden_states.dtype) * 1000  # 0-d
    limit = float(np.finfo(np.float16).max) - shrink
    return xp.minimum(xp.maximum(hidden_states, -limit), limit)
