"""Where each component sits in a CompVis / SGM single file: its key prefix, key plan and deliberately skipped keys.

SD 1.x/2.x: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` or ``vae.`` (VAE),
``cond_stage_model.transformer.`` (CLIP) or ``cond_stage_model.model.`` (OpenCLIP). SGM SDXL:
``conditioner.embedders.0.transformer.`` (CLIP-L, ``text_encoder``) and ``conditioner.embedders.1.model.``
(OpenCLIP bigG, ``text_encoder_2``; the refiner's only encoder is ``conditioner.embedders.0.model.``).
Names only; ``single_file`` reads the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_core.weights.single_file_keys import Entry, clip_plan, open_clip_plan, unet_plan, vae_plan

UNET_PREFIX = "model.diffusion_model."
_OPEN_CLIP_IGNORED = re.compile(r"text_projection|logit_scale|attn_mask|visual\..*|transformer\.resblocks\.(\d+)\..*")


@dataclass(frozen=True)
class Layout:
    """One component inside a checkpoint: its key prefix, its plan and the keys skipped on purpose."""

    prefix: str
    entries: list[Entry]
    ignored: Callable[[str], bool]  # relative key -> deliberately not loaded


def _with_prefix(keys: Mapping[str, Any], *prefixes: str) -> str | None:
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)


def _open_clip_layout(prefix: str, config: Mapping[str, Any], projection: bool) -> Layout:
    entries = open_clip_plan(config, projection)  # validates the config first
    layers = config["num_hidden_layers"]

    def ignored(key: str) -> bool:
        match = _OPEN_CLIP_IGNORED.fullmatch(key)
        return match is not None and (match.group(1) is None or int(match.group(1)) >= layers)

    return Layout(prefix, entries, ignored)


def _text_layout(keys: Mapping[str, Any], root: str, config: Mapping[str, Any]) -> Layout:
    """``text_encoder``: SD 1.x CLIP, SD 2.x OpenCLIP or SDXL's CLIP-L (``conditioner.embedders.0.transformer``)."""
    hf = f"{root}cond_stage_model.transformer."
    prefix = _with_prefix(keys, f"{hf}text_model.", hf, f"{root}conditioner.embedders.0.transformer.text_model.")
    if prefix is not None:
        return Layout(prefix, clip_plan(config), lambda key: key == "embeddings.position_ids")
    prefix = _with_prefix(keys, f"{root}cond_stage_model.model.")
    if prefix is None:
        raise ValueError(
            "checkpoint holds no text_encoder (no key starts with 'cond_stage_model.transformer.', "
            "'cond_stage_model.model.' or 'conditioner.embedders.0.transformer.'; an SDXL refiner's only "
            "encoder, 'conditioner.embedders.0.model.', is text_encoder_2: CLIPTextModelWithProjection)"
        )
    return _open_clip_layout(prefix, config, projection=False)


def _text_2_layout(keys: Mapping[str, Any], root: str, config: Mapping[str, Any]) -> Layout:
    """``text_encoder_2``: SDXL's OpenCLIP bigG with its projection (base: embedder 1, refiner: embedder 0)."""
    prefix = _with_prefix(keys, f"{root}conditioner.embedders.1.model.", f"{root}conditioner.embedders.0.model.")
    if prefix is None:
        raise ValueError(
            "checkpoint holds no text_encoder_2 (no key starts with 'conditioner.embedders.1.model.' (SDXL base) "
            "or 'conditioner.embedders.0.model.' (SDXL refiner); SD 1.x/2.x files have only text_encoder)"
        )
    return _open_clip_layout(prefix, config, projection=True)


def component_layout(keys: Mapping[str, Any], root: str, component: str, config: Mapping[str, Any]) -> Layout:
    """Where ``component`` sits in a checkpoint with ``keys`` (under ``root``, e.g. ``"state_dict."``) and its plan."""
    if component == "text_encoder":
        return _text_layout(keys, root, config)
    if component == "text_encoder_2":
        return _text_2_layout(keys, root, config)
    if component == "unet":
        prefix, entries = _with_prefix(keys, root + UNET_PREFIX), unet_plan(config)
    else:
        prefix, entries = _with_prefix(keys, f"{root}first_stage_model.", f"{root}vae."), vae_plan(config)
    if prefix is None:
        raise ValueError(f"checkpoint holds no {component} weights (no key starts with the CompVis prefix)")
    return Layout(prefix, entries, lambda key: False)
