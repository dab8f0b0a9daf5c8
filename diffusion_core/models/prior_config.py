"""unCLIP's prior and text projection, framework-neutral: config defaults, resolved sizes and the attention bias.

``PriorTransformer`` (Ramesh et al. 2022, arXiv 2204.06125, sec. 2.2) denoises a CLIP image
embedding with a causal transformer over [text tokens, text embedding, timestep, noisy image
embedding, prd token]; ``UnCLIPTextProjModel`` (sec. 2.1) turns the image embedding into the
decoder's class embedding and extra context tokens. Both backends build their modules from the
sizes resolved here, with diffusers 0.42's config fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.models.model_config import activation_name, check_choice, check_int, resolve_config

PRIOR_TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,  # text tokens the prior attends to
    "additional_embeddings": 4,  # text embedding, timestep, noisy image embedding, prd token
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,  # None or "layer"
    "embedding_proj_norm_type": None,  # None or "layer"
    "encoder_hid_proj_type": "linear",  # None (no text tokens) or "linear"
    "added_emb_type": "prd",  # "prd": a learned last token whose output is the prediction; or None
    "time_embed_dim": None,  # None: the inner width (heads * head_dim)
    "embedding_proj_dim": None,  # None: embedding_dim
    "clip_embed_dim": None,  # None: embedding_dim
}

UNCLIP_TEXT_PROJ_DEFAULTS: dict[str, Any] = {
    "clip_extra_context_tokens": 4,  # context tokens made from the image embedding
    "clip_embeddings_dim": 768,
    "time_embed_dim": None,  # required: the decoder UNet's time embedding width
    "cross_attention_dim": None,  # required: the decoder UNet's cross-attention width
}

MASK_BIAS = -10000.0  # diffusers' additive bias for a hidden (masked or future) token


class PriorTransformerOutput(NamedTuple):
    """diffusers' output name; a NamedTuple so ``out[0]`` (``return_dict=False``) works too and jax traces it."""

    predicted_image_embedding: Any  # (B, clip_embed_dim)


@dataclass(frozen=True)
class PriorDims:
    """The prior's resolved widths."""

    inner_dim: int  # heads * head_dim: the transformer width
    time_embed_dim: int  # hidden width of the timestep MLP
    embedding_proj_dim: int  # width of the conditioning text embedding
    clip_embed_dim: int  # width of the predicted image embedding (and clip_mean / clip_std)
    num_positions: int  # num_embeddings + additional_embeddings: positional table and causal mask size


def prior_transformer_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The full, checked ``PriorTransformer`` config (ValueError naming the bad field)."""
    cfg = resolve_config(kwargs, PRIOR_TRANSFORMER_DEFAULTS, "PriorTransformer")
    for name in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim"):
        check_int(name, cfg[name])
    for name in ("num_embeddings", "additional_embeddings"):
        check_int(name, cfg[name], minimum=0)
    for name in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
        if cfg[name] is not None:
            check_int(name, cfg[name])
    activation_name(cfg["time_embed_act_fn"], "time_embed_act_fn")
    check_choice("norm_in_type", cfg["norm_in_type"], (None, "layer"))
    check_choice("embedding_proj_norm_type", cfg["embedding_proj_norm_type"], (None, "layer"))
    check_choice("encoder_hid_proj_type", cfg["encoder_hid_proj_type"], (None, "linear"))
    check_choice("added_emb_type", cfg["added_emb_type"], (None, "prd"))
    if cfg["dropout"] != 0.0:
        raise ValueError(f"dropout: only 0.0 (inference) is supported, got {cfg['dropout']!r}")
    return cfg


def prior_dims(cfg: Mapping[str, Any]) -> PriorDims:
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return PriorDims(
        inner_dim=inner,
        time_embed_dim=cfg["time_embed_dim"] or inner,
        embedding_proj_dim=cfg["embedding_proj_dim"] or cfg["embedding_dim"],
        clip_embed_dim=cfg["clip_embed_dim"] or cfg["embedding_dim"],
        num_positions=cfg["num_embeddings"] + cfg["additional_embeddings"],
    )


def unclip_text_proj_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The full, checked ``UnCLIPTextProjModel`` config; ``time_embed_dim`` and ``cross_attention_dim`` are required."""
    cfg = resolve_config(kwargs, UNCLIP_TEXT_PROJ_DEFAULTS, "UnCLIPTextProjModel")
    for name in UNCLIP_TEXT_PROJ_DEFAULTS:
        check_int(name, cfg[name])
    return cfg


def positional_padding(num_positions: int, seq_len: int, lead_len: int, has_prd: bool) -> tuple[int, int]:
    """(front, back) zero rows that stretch the positional table to ``seq_len`` tokens, as diffusers pads it.

    The table covers the sequence exactly for unCLIP; a longer sequence (Shap-E's prior: 3-D hidden
    states, no text tokens) gets zeros over its ``lead_len`` leading tokens and the prd token.
    """
    if num_positions >= seq_len:
        if num_positions != seq_len:
            raise ValueError(
                f"hidden_states: the prior's sequence has {seq_len} tokens but num_embeddings + "
                f"additional_embeddings = {num_positions}"
            )
        return 0, 0
    front, back = lead_len, int(has_prd)
    if num_positions + front + back != seq_len:
        raise ValueError(f"hidden_states: {seq_len} tokens do not fit {num_positions} positions")
    return front, back


def prior_attention_bias(attention_mask, like, num_positions: int, additional_embeddings: int):
    """(B, L, L) additive bias in ``like``'s framework and dtype from the (B, T) 0/1 text ``attention_mask``.

    Hidden text tokens and future tokens get ``MASK_BIAS``; both add up, as in diffusers (a hidden
    future pad token: 2 * MASK_BIAS). The extra tokens after the text are always visible.
    """
    xp = arrays.namespace(like)
    batch, tokens = attention_mask.shape
    if tokens + additional_embeddings != num_positions:
        expected = num_positions - additional_embeddings
        raise ValueError(f"attention_mask: expected (B, {expected}) text flags, got {tuple(attention_mask.shape)}")
    hidden = (1 - xp.astype(attention_mask, like.dtype)) * MASK_BIAS  # (B, T)
    visible = arrays.host_to_like(np.zeros((batch, additional_embeddings)), like)  # (B, extra)
    keys = xp.concat([hidden, visible], axis=1)  # (B, L)
    causal = arrays.host_to_like(np.triu(np.full((num_positions, num_positions), MASK_BIAS), 1), like)  # (L, L)
    return keys[:, None, :] + causal[None]  # (B, L, L)


def check_text_proj_batch(image_batch: int, prompt_batch: int) -> None:
    """``UnCLIPTextProjModel``: one image embedding per prompt embedding (after the guidance copy)."""
    if image_batch != prompt_batch:
        raise ValueError(
            f"image_embeddings: {image_batch} rows (with the guidance copy) for {prompt_batch} prompt_embeds rows"
        )
