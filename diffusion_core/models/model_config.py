"""Model configs shared by both backends: diffusers config.json fields and UNet2DModel's option checks.

The networks exist once per framework; which options they accept, and how a config.json
mapping becomes constructor arguments, is framework-neutral and lives here once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

# UNet2DModel options this library implements (diffusers names)
UNET_2D_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UNET_2D_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
UNET_2D_MID_BLOCKS = ("UNetMidBlock2D", None)
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def check_choice(name: str, value: Any, accepted: Iterable) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``accepted``."""
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"{name}: unsupported value {value!r}; accepted: {accepted}")


def block_name(name: str) -> str:
    """diffusers accepts a legacy ``UNetRes`` prefix on block names."""
    return name[len("UNetRes") :] if name.startswith("UNetRes") else name


def validate_unet_2d_config(cfg: Mapping[str, Any]) -> None:
    """Check every UNet2DModel option the backends interpret; ValueError names the bad one.

    (The activation name is checked by each backend's ``get_activation``.)
    """
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(
            "down_block_types, up_block_types and block_out_channels must have the same length; got "
            f"{len(cfg['down_block_types'])}, {len(cfg['up_block_types'])} and {n}"
        )
    for name in cfg["down_block_types"]:
        check_choice("down_block_types", block_name(name), UNET_2D_DOWN_BLOCKS)
    for name in cfg["up_block_types"]:
        check_choice("up_block_types", block_name(name), UNET_2D_UP_BLOCKS)
    check_choice("mid_block_type", cfg["mid_block_type"], UNET_2D_MID_BLOCKS)
    check_choice("time_embedding_type", cfg["time_embedding_type"], TIME_EMBEDDING_TYPES)
    check_choice("class_embed_type", cfg["class_embed_type"], CLASS_EMBED_TYPES)
    check_choice("resnet_time_scale_shift", cfg["resnet_time_scale_shift"], TIME_SCALE_SHIFTS)
    if cfg["time_embedding_type"] == "learned" and cfg["num_train_timesteps"] is None:
        raise ValueError("num_train_timesteps: required when time_embedding_type is 'learned'")
    if not isinstance(cfg["norm_num_groups"], int):
        raise ValueError(f"norm_num_groups: expected an int, got {cfg['norm_num_groups']!r}")


# AutoencoderKL block types this library implements
VAE_DOWN_BLOCKS = ("DownEncoderBlock2D",)
VAE_UP_BLOCKS = ("UpDecoderBlock2D",)


def validate_autoencoder_kl_config(cfg: Mapping[str, Any]) -> None:
    """Check every AutoencoderKL option the backends interpret; ValueError names the bad one.

    (The activation name is checked by each backend's ``get_activation``.)
    """
    n = len(cfg["block_out_channels"])
    if n < 1 or len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(
            "down_block_types, up_block_types and block_out_channels must have the same non-zero length; got "
            f"{len(cfg['down_block_types'])}, {len(cfg['up_block_types'])} and {n}"
        )
    for field, accepted in (("down_block_types", VAE_DOWN_BLOCKS), ("up_block_types", VAE_UP_BLOCKS)):
        for name in cfg[field]:
            check_choice(field, name, accepted)
    groups = cfg["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in cfg["block_out_channels"]):
        raise ValueError(
            f"norm_num_groups: {groups!r} must be a positive int dividing every block_out_channels "
            f"entry {list(cfg['block_out_channels'])}"
        )
    if cfg["layers_per_block"] < 1:
        raise ValueError(f"layers_per_block: expected >= 1, got {cfg['layers_per_block']}")


def init_kwargs_from_config(config: Any, fields: Iterable[str], owner: str) -> dict[str, Any]:
    """Constructor kwargs from a diffusers ``config.json`` mapping.

    ``_``-prefixed keys (``_class_name``, ``_diffusers_version``) are ignored; other keys the
    model does not take are ignored with one warning (configs of newer diffusers versions).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(config).__name__}")
    fields = set(fields)
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(given) - fields)
    if unknown:
        warnings.warn(f"{owner}.from_config: ignoring unknown config keys {unknown}", stacklevel=3)
    return {k: v for k, v in given.items() if k in fields}
