"""UNet2DModel and AutoencoderKL configs for both backends: diffusers' defaults and block layout.

The two networks exist once per framework; their config defaults and the per-block
constructor arguments are framework-neutral and written here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusion_core.models.model_config import block_name

VAE_EPS = 1e-6  # GroupNorm epsilon of every AutoencoderKL norm (diffusers hard-codes it)

# diffusers 0.42.1 UNet2DModel defaults (every config.json field).
UNET_2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# diffusers 0.42.1 AutoencoderKL defaults (every config.json field).
AUTOENCODER_KL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def unet_2d_time_dims(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(width of the timestep projection, width of the time embedding) of a UNet2DModel."""
    width = cfg["block_out_channels"][0]
    proj_dim = 2 * width if cfg["time_embedding_type"] == "fourier" else width
    return proj_dim, cfg["time_embedding_dim"] or 4 * width


def unet_2d_down_blocks(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(block type, keyword arguments after ``opts``) of each UNet2DModel down block."""
    channels = list(cfg["block_out_channels"])
    blocks = []
    for i, name in enumerate(cfg["down_block_types"]):
        kind = block_name(name)
        attention = kind == "AttnDownBlock2D"
        resample = "resnet" if kind == "ResnetDownsampleBlock2D" else cfg["downsample_type"] if attention else "conv"
        kwargs = {
            "in_channels": channels[max(i - 1, 0)],
            "out_channels": channels[i],
            "num_layers": cfg["layers_per_block"],
            "add_downsample": i < len(channels) - 1,
            "downsample_padding": cfg["downsample_padding"],
            "downsample_type": resample,
            "attention_head_dim": cfg["attention_head_dim"] or channels[i],
        }
        blocks.append(("DownBlock2D" if kind == "ResnetDownsampleBlock2D" else kind, kwargs))
    return blocks


def unet_2d_up_blocks(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(block type, keyword arguments after ``opts``) of each UNet2DModel up block."""
    rev = list(reversed(cfg["block_out_channels"]))
    blocks = []
    for i, name in enumerate(cfg["up_block_types"]):
        kind = block_name(name)
        attention = kind == "AttnUpBlock2D"
        resample = "resnet" if kind == "ResnetUpsampleBlock2D" else cfg["upsample_type"] if attention else "conv"
        kwargs = {
            "in_channels": rev[min(i + 1, len(rev) - 1)],
            "prev_output_channel": rev[max(i - 1, 0)],
            "out_channels": rev[i],
            "num_layers": cfg["layers_per_block"] + 1,
            "add_upsample": i < len(rev) - 1,
            "upsample_type": resample,
            "attention_head_dim": cfg["attention_head_dim"] or rev[i],
        }
        blocks.append(("UpBlock2D" if kind == "ResnetUpsampleBlock2D" else kind, kwargs))
    return blocks


def unet_2d_mid_block(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Keyword arguments (after ``channels, opts``) of the UNet2DModel mid block, or None without one."""
    if cfg["mid_block_type"] is None:
        return None
    channels = cfg["block_out_channels"][-1]
    return {
        "attention_head_dim": cfg["attention_head_dim"] or channels,
        "attn_groups": cfg["attn_norm_num_groups"],
        "add_attention": cfg["add_attention"],
        "output_scale_factor": cfg["mid_block_scale_factor"],
    }


def vae_coder_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments an AutoencoderKL config gives both its ``Encoder`` and its ``Decoder``."""
    keys = ("block_out_channels", "layers_per_block", "norm_num_groups", "act_fn", "mid_block_add_attention")
    return {k: cfg[k] for k in keys}


def vae_block_specs(block_out_channels: Any, num_layers: int, up: bool) -> list[tuple[int, int, int, bool]]:
    """(in, out, resnets, resample) of each AutoencoderKL encoder (or, ``up``, decoder) block.

    Encoder blocks run ``num_layers`` resnets and downsample all but the last; decoder blocks
    walk the widths in reverse with one resnet more and upsample all but the last.
    """
    widths = list(reversed(block_out_channels)) if up else list(block_out_channels)
    layers = num_layers + 1 if up else num_layers
    return [(widths[max(i - 1, 0)], widths[i], layers, i < len(widths) - 1) for i in range(len(widths))]


__all__ = [
    "AUTOENCODER_KL_DEFAULTS",
    "UNET_2D_DEFAULTS",
    "VAE_EPS",
    "unet_2d_down_blocks",
    "unet_2d_mid_block",
    "unet_2d_time_dims",
    "unet_2d_up_blocks",
    "vae_block_specs",
    "vae_coder_kwargs",
]
