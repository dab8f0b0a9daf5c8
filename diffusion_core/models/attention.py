"""Attention conventions both backends share: the mask-to-bias formula, the per-call context, K-block norm groups.

A UNet call turns its (B, S) keep(1)/discard(0) masks into additive biases once (``attention_mask_bias``)
and hands every cross-attention block one ``AttentionContext``; each attention adds the bias to its scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from diffusion_core.arrays import namespace
from diffusion_core.models.model_config import K_GROUP_SIZE

__all__ = [
    "K_GROUP_SIZE",
    "MASK_BIAS",
    "AttentionContext",
    "added_kv_mask_bias",
    "attention_mask_bias",
    "attention_norm_groups",
]

MASK_BIAS = -10000.0  # what diffusers adds to the attention scores of a discarded key


def attention_mask_bias(mask: Any, like: Any) -> Any:
    """(B, S) keep(1)/discard(0) mask -> (B, 1, S) additive bias (0 or -10000) in ``like``'s dtype, or None.

    Array-API: runs on numpy, torch or jax arrays. ``like`` is the model input whose dtype the bias takes.
    """
    if mask is None:
        return None
    if getattr(mask, "ndim", None) != 2:
        raise ValueError(f"attention mask: expected a (B, S) array, got shape {tuple(np.shape(mask))}")
    xp = namespace(mask)
    return ((1 - xp.astype(mask, like.dtype)) * MASK_BIAS)[:, None, :]  # (B, 1, S)


def attention_norm_groups(channels: int, group_size: int = K_GROUP_SIZE) -> int:
    """GroupNorm groups of a K-UNet ``KAttentionBlock`` over ``channels``: one per ``group_size``, at least one."""
    return max(1, channels // group_size)


@dataclass(frozen=True)
class AttentionContext:
    """What the cross-attention blocks of one UNet call attend to.

    ``attention_mask`` / ``encoder_attention_mask``: (B, 1, S) additive biases from ``attention_mask_bias``
    for the self- and cross-attention keys, or None.
    """

    encoder_hidden_states: Any
    attention_mask: Any = None
    encoder_attention_mask: Any = None


def added_kv_mask_bias(ctx: AttentionContext, num_self_tokens: int, only_cross_attention: bool) -> Any:
    """(B, 1, S [+ HW]) bias over the keys of a Simple* block's added-K/V attention, or None.

    The keys are the encoder tokens, then (unless ``only_cross_attention``) the block's own H*W
    positions, which are never masked. diffusers hands these blocks ``attention_mask`` when one is
    given (unCLIP passes its text mask that way), else ``encoder_attention_mask``.
    """
    bias = ctx.attention_mask if ctx.attention_mask is not None else ctx.encoder_attention_mask
    if bias is None or only_cross_attention:
        return bias
    xp = namespace(bias)
    device = None if array_api_compat.is_jax_array(bias) else array_api_compat.device(bias)
    zeros = xp.zeros((bias.shape[0], 1, num_self_tokens), dtype=bias.dtype, device=device)
    return xp.concat([bias, zeros], axis=-1)  # (B, 1, S + HW)
