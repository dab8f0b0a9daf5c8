"""Model configs shared by both backends: diffusers config.json fields and UNet2DModel's option checks.

The networks exist once per framework; which options they accept, and how a config.json
mapping becomes constructor arguments, is framework-neutral and lives here once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# UNet2DModel options this library implements (diffusers names)
# Resnet{Down,Up}sampleBlock2D (unCLIP's super-resolution UNets) are Down/UpBlock2D with a resnet resampler
UNET_2D_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UNET_2D_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
UNET_2D_MID_BLOCKS = ("UNetMidBlock2D", None)
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")
TIME_SCALE_SHIFTS = ("default", "scale_shift")
# diffusers' ``get_activation`` names; "swish" is another name of "silu".
ACTIVATIONS = ("gelu", "mish", "relu", "silu", "swish")
_ACTIVATION_ALIASES = {"swish": "silu"}


def activation_name(name: Any, field: str = "act_fn") -> str:
    """The canonical name of a diffusers activation ("swish" -> "silu"); ValueError naming ``field`` otherwise."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{field}: unsupported activation {name!r}; accepted: {sorted(ACTIVATIONS)}")
    return _ACTIVATION_ALIASES.get(name, name)


def check_choice(name: str, value: Any, accepted: Iterable) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``accepted``."""
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"{name}: unsupported value {value!r}; accepted: {accepted}")


def block_name(name: str) -> str:
    """diffusers accepts a legacy ``UNetRes`` prefix on block names."""
    return name[len("UNetRes") :] if name.startswith("UNetRes") else name


def validate_unet_2d_config(cfg: Mapping[str, Any]) -> None:
    """Check every UNet2DModel option the backends interpret; ValueError names the bad one."""
    activation_name(cfg["act_fn"])
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
    """Check every AutoencoderKL option the backends interpret; ValueError names the bad one."""
    activation_name(cfg["act_fn"])
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


# ---- UNet2DConditionModel / ControlNetModel configs (plans: diffusion_core.models.unet_condition_config)
# Block types this library implements (diffusers names; the legacy "UNetRes" prefix is accepted).
CROSS_ATTN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")
K_BLOCKS = ("KDownBlock2D", "KCrossAttnDownBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D")
# DeepFloyd IF / unCLIP blocks: attention with added K/V projections of the encoder states (``Simple*``), and
# resnet (not conv) resamplers; their resnets read resnet_skip_time_act and resnet_out_scale_factor.
SIMPLE_CROSS_ATTN_BLOCKS = ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
RESNET_RESAMPLE_BLOCKS = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
COND_DOWN_BLOCKS = (
    "DownBlock2D", "CrossAttnDownBlock2D", "KDownBlock2D", "KCrossAttnDownBlock2D",
    "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
)  # fmt: skip
COND_UP_BLOCKS = (
    "UpBlock2D", "CrossAttnUpBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D",
    "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D",
)  # fmt: skip
COND_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "UNetMidBlock2DSimpleCrossAttn", None)
COND_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
# addition_embed_type values UNet2DConditionModel implements (plans: unet_condition_config.addition_plan)
ADDITION_EMBED_TYPES = (None, "text", "text_time")
CROSS_ATTENTION_NORMS = (None, "layer_norm", "group_norm")  # Simple* blocks' norm of the encoder states
CROSS_ATTENTION_NORM_GROUPS = 32  # diffusers' fixed GroupNorm groups of cross_attention_norm="group_norm"
K_GROUP_SIZE = 32  # K blocks norm with channels // 32 groups (diffusers' fixed resnet_group_size)

# diffusers 0.42.1 UNet2DConditionModel defaults (every config.json field).
UNET_2D_CONDITION_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,  # only read by the Simple*/Resnet* resample blocks
    "resnet_out_scale_factor": 1.0,  # only read by the Simple*/Resnet* resample blocks
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,  # only read by the SimpleCrossAttn mid block
    "cross_attention_norm": None,  # only read by Simple* blocks
    "addition_embed_type_num_heads": 64,  # only read by addition_embed_type="text" (its attention pooling)
}

# diffusers 0.42.1 ControlNetModel defaults (every config.json field).
CONTROLNET_DEFAULTS: dict[str, Any] = {
    **{
        k: UNET_2D_CONDITION_DEFAULTS[k]
        for k in (
            "in_channels",
            "flip_sin_to_cos",
            "freq_shift",
            "down_block_types",
            "mid_block_type",
            "only_cross_attention",
            "block_out_channels",
            "layers_per_block",
            "downsample_padding",
            "mid_block_scale_factor",
            "act_fn",
            "norm_num_groups",
            "norm_eps",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "attention_head_dim",
            "num_attention_heads",
            "use_linear_projection",
            "class_embed_type",
            "addition_embed_type",
            "addition_time_embed_dim",
            "num_class_embeds",
            "upcast_attention",
            "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim",
            "addition_embed_type_num_heads",
        )
    },  # fmt: skip
    "conditioning_channels": 3,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "global_pool_conditions": False,
}


def unet_2d_condition_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from a diffusers ``config.json`` mapping (unknown keys warned and dropped)."""
    return init_kwargs_from_config(config, UNET_2D_CONDITION_DEFAULTS, "UNet2DConditionModel")


def controlnet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from a diffusers ControlNetModel ``config.json`` mapping."""
    return init_kwargs_from_config(config, CONTROLNET_DEFAULTS, "ControlNetModel")


def resolve_config(kwargs: Mapping[str, Any], defaults: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Full config: ``defaults`` overridden by ``kwargs``; unknown keyword arguments are a ValueError."""
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"{owner}: unknown config options {unknown}; accepted: {sorted(defaults)}")
    cfg = {**defaults, **kwargs}
    if cfg.get("encoder_hid_dim") is not None and cfg.get("encoder_hid_dim_type", "") is None:
        cfg["encoder_hid_dim_type"] = "text_proj"  # the type diffusers implies (and records) for a bare dim
    return cfg


def per_block(cfg: Mapping[str, Any], name: str, n: int) -> list[Any]:
    """A scalar-or-list option as one value per down block (ValueError on a wrong length)."""
    value = cfg[name]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} entries (one per down block), got {len(value)}")
        return list(value)
    return [value] * n


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_common(cfg: Mapping[str, Any], n: int) -> None:
    """Options shared by UNet2DConditionModel and ControlNetModel."""
    activation_name(cfg["act_fn"])
    if n < 1:
        raise ValueError("block_out_channels: expected at least one block")
    for c in cfg["block_out_channels"]:
        check_int("block_out_channels", c)
    if cfg["num_attention_heads"] is not None:
        raise ValueError("num_attention_heads: must be None (diffusers reads attention_head_dim as the head count)")
    for name in ("only_cross_attention", "attention_head_dim", "cross_attention_dim", "layers_per_block"):
        per_block(cfg, name, n)
    for lpb in per_block(cfg, "layers_per_block", n):
        check_int("layers_per_block", lpb)
    for heads in per_block(cfg, "attention_head_dim", n):
        if heads is not None:
            check_int("attention_head_dim", heads)
    check_choice("resnet_time_scale_shift", cfg["resnet_time_scale_shift"], ("default", "scale_shift"))
    check_choice("encoder_hid_dim_type", cfg["encoder_hid_dim_type"], (None, "text_proj"))
    if cfg["encoder_hid_dim_type"] is not None and cfg["encoder_hid_dim"] is None:
        raise ValueError("encoder_hid_dim: required when encoder_hid_dim_type is set")
    if cfg["class_embed_type"] in ("projection", "simple_projection"):
        check_int("projection_class_embeddings_input_dim", cfg["projection_class_embeddings_input_dim"])
    if cfg["num_class_embeds"] is not None:
        check_int("num_class_embeds", cfg["num_class_embeds"])
    groups = cfg["norm_num_groups"]
    if groups is not None:
        check_int("norm_num_groups", groups)
        if any(c % groups for c in cfg["block_out_channels"]):
            raise ValueError(f"norm_num_groups: {groups} must divide every block_out_channels entry")


def transformer_layers(cfg: Mapping[str, Any], n: int) -> list[Any]:
    layers = per_block(cfg, "transformer_layers_per_block", n)
    nested = any(isinstance(x, Sequence) for x in layers)
    if nested and cfg.get("reverse_transformer_layers_per_block") is None:
        raise ValueError("reverse_transformer_layers_per_block: required when transformer_layers_per_block is nested")
    return layers


def validate_unet_2d_condition_config(cfg: Mapping[str, Any]) -> None:
    """Check every UNet2DConditionModel option the backends interpret; ValueError names the bad one.

    ``cfg`` is a full config (see ``resolve_config``).
    """
    for field in ("time_embedding_act_fn", "timestep_post_act"):
        if cfg[field] is not None:
            activation_name(cfg[field], field)
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(
            "down_block_types, up_block_types and block_out_channels must have the same length; got "
            f"{len(cfg['down_block_types'])}, {len(cfg['up_block_types'])} and {n}"
        )
    _check_common(cfg, n)
    for name in cfg["down_block_types"]:
        check_choice("down_block_types", block_name(name), COND_DOWN_BLOCKS)
    for name in cfg["up_block_types"]:
        check_choice("up_block_types", block_name(name), COND_UP_BLOCKS)
    check_choice("mid_block_type", cfg["mid_block_type"], COND_MID_BLOCKS)
    check_choice("time_embedding_type", cfg["time_embedding_type"], ("positional", "fourier"))
    check_choice("class_embed_type", cfg["class_embed_type"], COND_CLASS_EMBED_TYPES)
    validate_addition_embedding(cfg)
    _check_simple_blocks(cfg, n)
    check_choice("dual_cross_attention", cfg["dual_cross_attention"], (False,))
    check_choice("attention_type", cfg["attention_type"], ("default",))
    transformer_layers(cfg, n)
    for name in ("conv_in_kernel", "conv_out_kernel"):
        if not isinstance(cfg[name], int) or cfg[name] < 1 or cfg[name] % 2 == 0:
            raise ValueError(f"{name}: expected an odd positive int, got {cfg[name]!r}")
    if cfg["time_cond_proj_dim"] is not None:
        check_int("time_cond_proj_dim", cfg["time_cond_proj_dim"])
    if cfg["time_embedding_type"] == "fourier" and time_embed_dim(cfg) % 2:
        raise ValueError(f"time_embedding_dim: must be even for fourier embeddings, got {time_embed_dim(cfg)}")
    standard = [
        block_name(b) for b in (*cfg["down_block_types"], *cfg["up_block_types"]) if block_name(b) not in K_BLOCKS
    ]
    if cfg["norm_num_groups"] is None and (standard or cfg["mid_block_type"] is not None):
        raise ValueError(
            "norm_num_groups: None is only supported when every block is a K block and mid_block_type is None"
        )


def validate_addition_embedding(cfg: Mapping[str, Any]) -> None:
    """``addition_embed_type`` and the fields its embedding reads (one branch per type)."""
    check_choice("addition_embed_type", cfg["addition_embed_type"], ADDITION_EMBED_TYPES)
    if cfg["addition_embed_type"] == "text_time":
        check_int("addition_time_embed_dim", cfg["addition_time_embed_dim"])
        check_int("projection_class_embeddings_input_dim", cfg["projection_class_embeddings_input_dim"])
    elif cfg["addition_embed_type"] == "text":
        width = cfg["encoder_hid_dim"] or cfg["cross_attention_dim"]
        check_int("addition_embed_type_num_heads", cfg["addition_embed_type_num_heads"])
        if not isinstance(width, int) or width % cfg["addition_embed_type_num_heads"]:
            raise ValueError(
                f"addition_embed_type_num_heads: {cfg['addition_embed_type_num_heads']} must divide the text width "
                f"(encoder_hid_dim or cross_attention_dim, an int), got {width!r}"
            )


def _check_simple_blocks(cfg: Mapping[str, Any], n: int) -> None:
    """Options of the Simple* (added K/V attention) blocks."""
    check_choice("cross_attention_norm", cfg["cross_attention_norm"], CROSS_ATTENTION_NORMS)
    check_choice("mid_block_only_cross_attention", cfg["mid_block_only_cross_attention"], (None, False, True))
    names = [block_name(b) for b in (*cfg["down_block_types"], *cfg["up_block_types"], cfg["mid_block_type"] or "")]
    if cfg["mid_block_type"] == "UNetMidBlock2DSimpleCrossAttn" and per_block(cfg, "attention_head_dim", n)[-1] is None:
        raise ValueError("attention_head_dim: UNetMidBlock2DSimpleCrossAttn needs an int head dim, got None")
    if any(b in SIMPLE_CROSS_ATTN_BLOCKS for b in names):
        for dim in per_block(cfg, "cross_attention_dim", n):
            check_int("cross_attention_dim", dim)
    if cfg["cross_attention_norm"] == "group_norm" and any(b in SIMPLE_CROSS_ATTN_BLOCKS for b in names):
        for dim in per_block(cfg, "cross_attention_dim", n):
            if dim % CROSS_ATTENTION_NORM_GROUPS:
                raise ValueError(
                    f"cross_attention_dim: cross_attention_norm='group_norm' needs a multiple of "
                    f"{CROSS_ATTENTION_NORM_GROUPS}, got {dim}"
                )


def validate_controlnet_config(cfg: Mapping[str, Any]) -> None:
    """Check every ControlNetModel option the backends interpret; ValueError names the bad one."""
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n:
        raise ValueError(
            "down_block_types and block_out_channels must have the same length; got "
            f"{len(cfg['down_block_types'])} and {n}"
        )
    check_choice("class_embed_type", cfg["class_embed_type"], (None, "timestep", "identity", "projection"))
    check_choice("addition_embed_type", cfg["addition_embed_type"], (None, "text_time"))  # IF's "text": UNet only
    validate_addition_embedding(cfg)
    _check_common(cfg, n)
    if cfg["norm_num_groups"] is None:
        raise ValueError("norm_num_groups: an int is required for ControlNetModel")
    for name in cfg["down_block_types"]:
        check_choice("down_block_types", block_name(name), ("DownBlock2D", "CrossAttnDownBlock2D"))
    check_choice("mid_block_type", cfg["mid_block_type"], ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"))
    check_choice("controlnet_conditioning_channel_order", cfg["controlnet_conditioning_channel_order"], ("rgb", "bgr"))
    check_int("layers_per_block", cfg["layers_per_block"])
    check_int("cross_attention_dim", cfg["cross_attention_dim"])
    if any(isinstance(x, Sequence) for x in per_block(cfg, "transformer_layers_per_block", n)):
        raise ValueError("transformer_layers_per_block: nested lists are not supported by ControlNetModel")
    channels = cfg["conditioning_embedding_out_channels"]
    if not isinstance(channels, Sequence) or len(channels) < 1:
        raise ValueError(f"conditioning_embedding_out_channels: expected a non-empty list, got {channels!r}")
    check_int("conditioning_channels", cfg["conditioning_channels"])


def time_embed_dim(cfg: Mapping[str, Any]) -> int:
    factor = 2 if cfg["time_embedding_type"] == "fourier" else 4
    return cfg.get("time_embedding_dim") or cfg["block_out_channels"][0] * factor
