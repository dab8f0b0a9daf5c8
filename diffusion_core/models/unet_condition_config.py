"""UNet2DConditionModel / ControlNetModel configs, resolved once into per-block plans for both backends.

diffusers' config has naming quirks (``attention_head_dim`` is the *number of heads* of the
cross-attention blocks but the *channels per head* of the K blocks; up blocks reverse some
per-block lists but not others). ``unet_2d_condition_plan`` resolves all of that here, so the
torch and flax networks only read plain numbers from frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core.models.attention import attention_mask_bias
from diffusion_core.models.model_config import (
    CONTROLNET_DEFAULTS,
    CROSS_ATTN_BLOCKS,
    K_BLOCKS,
    K_GROUP_SIZE,
    RESNET_RESAMPLE_BLOCKS,
    SIMPLE_CROSS_ATTN_BLOCKS,
    block_name,
    check_int,
    controlnet_kwargs,
    per_block,
    resolve_config,
    time_embed_dim,
    transformer_layers,
    unet_2d_condition_kwargs,
    validate_controlnet_config,
    validate_unet_2d_condition_config,
)
from diffusion_core.models.model_config import UNET_2D_CONDITION_DEFAULTS as UNET_2D_CONDITION_DEFAULTS

__all__ = [
    "CONTROLNET_DEFAULTS",
    "AdditionPlan",
    "UNET_2D_CONDITION_DEFAULTS",
    "BlockPlan",
    "ControlNetPlan",
    "TimePlan",
    "UNet2DConditionPlan",
    "controlnet_kwargs",
    "controlnet_plan",
    "controlnet_residual_scales",
    "required_addition",
    "attention_mask_bias",
    "resolve_config",
    "unet_2d_condition_kwargs",
    "unet_2d_condition_plan",
    "validate_controlnet_config",
    "validate_unet_2d_condition_config",
]


@dataclass(frozen=True)
class BlockPlan:
    """One down, mid or up block, with every number a backend needs to build it.

    Attention layout: standard cross-attention blocks run ``Transformer2DModel`` with
    ``num_attention_heads`` heads of ``attention_head_dim`` channels (inner width = their product,
    which may be below ``out_channels``). K blocks' ``KAttentionBlock`` uses ``attention_head_dim``
    channels per head and ``channels // attention_head_dim`` heads for an attention over ``channels``;
    so do the Simple* blocks' added-K/V attentions (``attention_head_dim`` None: one head over ``channels``).
    """

    block_type: str  # canonical diffusers class name
    in_channels: int  # down: block input; up: skip width of the last resnet; mid: channels
    out_channels: int
    num_layers: int  # resnets in the block (up blocks: layers_per_block + 1; K up blocks build one fewer)
    temb_channels: int  # width of the embedding every resnet receives
    norm_groups: int | None  # GroupNorm groups of resnets/transformers; None for K blocks (see group_size)
    norm_eps: float
    act_fn: str
    prev_output_channel: int | None = None  # up blocks: width of the incoming running state
    add_downsample: bool = False
    add_upsample: bool = False
    downsample_padding: int = 1
    has_cross_attention: bool = False
    num_attention_heads: int | None = None
    attention_head_dim: int | None = None
    cross_attention_dim: int | None = None
    transformer_layers: tuple[int, ...] = ()  # per resnet: BasicTransformerBlocks in its Transformer2DModel
    only_cross_attention: bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    add_self_attention: bool = False  # K cross blocks: KAttentionBlock also self-attends
    group_size: int = K_GROUP_SIZE  # K blocks: GroupNorm groups = channels // group_size
    time_scale_shift: str = "default"  # standard resnets: "default" add or "scale_shift" FiLM
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    skip_time_act: bool = False  # Simple*/Resnet* resample blocks: resnets project temb without the activation
    cross_attention_norm: str | None = None  # Simple* blocks: None, "layer_norm" or "group_norm" of the context


@dataclass(frozen=True)
class TimePlan:
    """Timestep (and class) embedding of the model."""

    kind: str  # "positional" (sinusoidal Timesteps) or "fourier" (GaussianFourierProjection, log=False)
    proj_dim: int  # width of the timestep projection (input of time_embedding.linear_1)
    embed_dim: int  # width of the time embedding
    flip_sin_to_cos: bool
    freq_shift: float
    fourier_size: int | None  # fourier: GaussianFourierProjection embedding_size (= embed_dim // 2)
    act_fn: str  # time_embedding activation between linear_1 and linear_2
    post_act_fn: str | None  # timestep_post_act
    cond_proj_dim: int | None  # time_cond_proj_dim: time_embedding.cond_proj (no bias) of timestep_cond
    embed_act_fn: str | None  # time_embedding_act_fn, applied to the summed embedding
    class_embed: str | None  # None, "embedding" (nn.Embedding), "timestep", "identity", "projection",
    #                          "simple_projection"
    class_in_dim: int | None  # embedding: num_class_embeds; (simple_)projection: input width
    class_act_fn: str  # activation of a "timestep"/"projection" class TimestepEmbedding
    class_concat: bool  # class_embeddings_concat: blocks get [time | class] (2 * embed_dim)


@dataclass(frozen=True)
class AdditionPlan:
    """diffusers' ``addition_embed_type``: a further embedding (``add_embedding``) added to the time embedding.

    ``"text"`` (DeepFloyd IF): ``TextTimeEmbedding`` of the encoder states before ``encoder_hid_proj``
    (LayerNorm, attention pooling with ``num_heads`` heads, linear, LayerNorm).
    ``"text_time"`` (SDXL): ``add_embedding(cat([text_embeds, add_time_proj(time_ids).reshape(B, -1)]))``, the
    pooled text embedding and sinusoidal features of the size/crop ids.
    """

    kind: str  # an ADDITION_EMBED_TYPES entry other than None
    in_dim: int  # add_embedding input width (text: encoder_hid_dim or cross_attention_dim;
    # text_time: projection_class_embeddings_input_dim)
    embed_dim: int  # = the time embedding width it is added to
    num_heads: int | None = None  # text: attention-pooling heads (addition_embed_type_num_heads)
    time_proj_dim: int | None = None  # text_time: add_time_proj channels per id (addition_time_embed_dim)
    flip_sin_to_cos: bool = True  # text_time: add_time_proj options (the UNet's flip_sin_to_cos / freq_shift)
    freq_shift: float = 0.0


@dataclass(frozen=True)
class UNet2DConditionPlan:
    in_channels: int
    out_channels: int
    conv_in_kernel: int
    conv_out_kernel: int
    block_out_channels: tuple[int, ...]
    time: TimePlan
    encoder_hid_proj: tuple[int, int] | None  # text_proj Linear (encoder_hid_dim, cross_attention_dim)
    down: tuple[BlockPlan, ...]
    mid: BlockPlan | None
    up: tuple[BlockPlan, ...]
    norm_out_groups: int | None  # conv_norm_out GroupNorm groups; None: no conv_norm_out/conv_act
    norm_eps: float
    act_fn: str
    num_upsamplers: int  # 2**num_upsamplers must divide H, W, else upsample sizes are forwarded
    center_input_sample: bool
    addition: AdditionPlan | None = None  # addition_embed_type (SDXL's "text_time"), see addition_plan


@dataclass(frozen=True)
class ControlNetPlan:
    in_channels: int
    conditioning_channels: int
    conditioning_embedding_out_channels: tuple[int, ...]
    block_out_channels: tuple[int, ...]
    time: TimePlan
    encoder_hid_proj: tuple[int, int] | None
    down: tuple[BlockPlan, ...]
    mid: BlockPlan  # ControlNet always has a mid block
    controlnet_down_channels: tuple[int, ...]  # zero 1x1 conv widths, one per down residual
    flip_channels: bool  # controlnet_conditioning_channel_order == "bgr"
    global_pool_conditions: bool
    addition: AdditionPlan | None = None  # addition_embed_type (SDXL ControlNets: "text_time")


def _time_plan(cfg: Mapping[str, Any], *, controlnet: bool = False) -> TimePlan:
    """Resolve the time/class embedding choices (ControlNet: positional only, no cond/post act)."""
    width = cfg["block_out_channels"][0]
    fourier = not controlnet and cfg["time_embedding_type"] == "fourier"
    embed_dim = width * 4 if controlnet else time_embed_dim(cfg)
    proj_dim = embed_dim if fourier else width
    kind = cfg["class_embed_type"]
    class_in = cfg["projection_class_embeddings_input_dim"]
    if kind is None and cfg["num_class_embeds"] is not None:
        kind, class_in = "embedding", cfg["num_class_embeds"]
    elif kind == "timestep":
        class_in = proj_dim
    elif kind == "identity":
        class_in = None
    return TimePlan(
        kind="fourier" if fourier else "positional",
        proj_dim=proj_dim,
        embed_dim=embed_dim,
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        fourier_size=embed_dim // 2 if fourier else None,
        act_fn=cfg["act_fn"],
        post_act_fn=None if controlnet else cfg["timestep_post_act"],
        cond_proj_dim=None if controlnet else cfg["time_cond_proj_dim"],
        embed_act_fn=None if controlnet else cfg["time_embedding_act_fn"],
        class_embed=kind,
        class_in_dim=class_in,
        class_act_fn=cfg["act_fn"] if kind == "timestep" and not controlnet else "silu",
        class_concat=bool(cfg.get("class_embeddings_concat", False)),
    )


def addition_plan(cfg: Mapping[str, Any], embed_dim: int) -> AdditionPlan | None:
    """The ``addition_embed_type`` embedding of a validated config, or None (one branch per type)."""
    kind = cfg["addition_embed_type"]
    if kind is None:
        return None
    if kind == "text_time":
        return AdditionPlan(
            kind=kind,
            in_dim=cfg["projection_class_embeddings_input_dim"],
            embed_dim=embed_dim,
            time_proj_dim=cfg["addition_time_embed_dim"],
            flip_sin_to_cos=cfg["flip_sin_to_cos"],
            freq_shift=cfg["freq_shift"],
        )
    if kind == "text":
        width = cfg["encoder_hid_dim"] or cfg["cross_attention_dim"]
        heads = cfg["addition_embed_type_num_heads"]
        return AdditionPlan(kind=kind, in_dim=width, embed_dim=embed_dim, num_heads=heads)
    raise ValueError(f"addition_embed_type: unsupported value {kind!r}")


def required_addition(added_cond_kwargs: Mapping[str, Any] | None, name: str, kind: str) -> Any:
    """``added_cond_kwargs[name]``, which ``addition_embed_type=kind`` reads; ValueError when it is missing."""
    if not added_cond_kwargs or added_cond_kwargs.get(name) is None:
        raise ValueError(f"added_cond_kwargs: {name!r} is required by addition_embed_type={kind!r}")
    return added_cond_kwargs[name]


def _encoder_hid_proj(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    if cfg["encoder_hid_dim"] is None:
        return None
    cross = cfg["cross_attention_dim"]
    if not isinstance(cross, int):
        raise ValueError("cross_attention_dim: must be an int when encoder_hid_dim is set")
    return (cfg["encoder_hid_dim"], cross)


def _layers_tuple(value: Any, num_layers: int) -> tuple[int, ...]:
    """transformer_layers_per_block entry (int, or one int per resnet) as a per-resnet tuple."""
    layers = tuple(value) if isinstance(value, Sequence) else (value,) * num_layers
    if len(layers) < num_layers:
        raise ValueError(f"transformer_layers_per_block: expected {num_layers} entries per block, got {list(layers)}")
    for count in layers:
        check_int("transformer_layers_per_block", count)
    return layers[:num_layers]


def _attention(
    kind: str, channels: int, heads_or_dim: Any, cross_dim: Any, layers: tuple[int, ...], norm: str | None = None
) -> dict[str, Any]:
    """Attention fields of a block: diffusers' head-count/head-dim quirk is resolved here (norm: of the context)."""
    if kind in CROSS_ATTN_BLOCKS:
        if heads_or_dim is None or heads_or_dim > channels:
            raise ValueError(f"attention_head_dim: {heads_or_dim!r} heads do not fit {channels} channels")
        check_int("cross_attention_dim", cross_dim)
        heads = heads_or_dim  # config attention_head_dim is the head count of Transformer2DModel
        return dict(
            has_cross_attention=True,
            num_attention_heads=heads,
            attention_head_dim=channels // heads,
            cross_attention_dim=cross_dim,
            transformer_layers=layers,
        )
    if kind in ("KCrossAttnDownBlock2D", "KCrossAttnUpBlock2D", *SIMPLE_CROSS_ATTN_BLOCKS):
        head_dim = heads_or_dim or channels  # here it is the channels per head
        if head_dim > channels:
            raise ValueError(f"attention_head_dim: head dim {head_dim} exceeds {channels} channels")
        check_int("cross_attention_dim", cross_dim)
        if kind in SIMPLE_CROSS_ATTN_BLOCKS and norm == "layer_norm" and cross_dim != channels:
            raise ValueError(  # diffusers sizes that LayerNorm by the block width but applies it to the context
                f"cross_attention_norm: 'layer_norm' needs cross_attention_dim == the block width ({channels}), "
                f"got {cross_dim}"
            )
        return dict(
            has_cross_attention=True,
            num_attention_heads=channels // head_dim,
            attention_head_dim=head_dim,
            cross_attention_dim=cross_dim,
        )
    return {}


def _resnet_fields(cfg: Mapping[str, Any], kind: str, temb: int) -> dict[str, Any]:
    k_block = kind in K_BLOCKS
    if kind in SIMPLE_CROSS_ATTN_BLOCKS or kind in RESNET_RESAMPLE_BLOCKS:  # only these read the resnet_* options
        simple = dict(
            skip_time_act=bool(cfg["resnet_skip_time_act"]),
            cross_attention_norm=cfg["cross_attention_norm"],
            output_scale_factor=cfg["resnet_out_scale_factor"],
        )
    else:
        simple = {}
    return dict(
        **simple,
        temb_channels=temb,
        norm_groups=None if k_block else cfg["norm_num_groups"],
        norm_eps=cfg["norm_eps"],
        act_fn=cfg["act_fn"],
        time_scale_shift=cfg["resnet_time_scale_shift"],
        dropout=cfg.get("dropout", 0.0),
        use_linear_projection=cfg["use_linear_projection"],
        upcast_attention=cfg["upcast_attention"] and kind not in K_BLOCKS,  # diffusers never passes it to K blocks
    )


def _down_plans(cfg: Mapping[str, Any], temb: int) -> tuple[BlockPlan, ...]:
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    heads = per_block(cfg, "attention_head_dim", n)
    cross = per_block(cfg, "cross_attention_dim", n)
    lpb = per_block(cfg, "layers_per_block", n)
    only_cross = per_block(cfg, "only_cross_attention", n)
    layers = per_block(cfg, "transformer_layers_per_block", n)
    plans = []
    for i, name in enumerate(cfg["down_block_types"]):
        kind = block_name(name)
        final = i == n - 1
        plans.append(
            BlockPlan(
                block_type=kind,
                in_channels=channels[max(i - 1, 0)],
                out_channels=channels[i],
                num_layers=lpb[i],
                add_downsample=not final,
                downsample_padding=cfg["downsample_padding"],
                only_cross_attention=bool(only_cross[i]),
                add_self_attention=kind == "KCrossAttnDownBlock2D" and final,
                **_attention(
                    kind,
                    channels[i],
                    heads[i],
                    cross[i],
                    _layers_tuple(layers[i], lpb[i]),
                    cfg.get("cross_attention_norm"),
                ),
                **_resnet_fields(cfg, kind, temb),
            )
        )
    return tuple(plans)


def _up_plans(cfg: Mapping[str, Any], temb: int) -> tuple[BlockPlan, ...]:
    rev = list(reversed(cfg["block_out_channels"]))
    n = len(rev)
    heads = per_block(cfg, "attention_head_dim", n)  # K and Simple* blocks read it un-reversed (diffusers' indexing)
    rev_heads = list(reversed(heads))
    cross = list(reversed(per_block(cfg, "cross_attention_dim", n)))
    lpb = list(reversed(per_block(cfg, "layers_per_block", n)))
    only_cross = list(reversed(per_block(cfg, "only_cross_attention", n)))
    layers = cfg.get("reverse_transformer_layers_per_block") or list(reversed(transformer_layers(cfg, n)))
    plans = []
    for i, name in enumerate(cfg["up_block_types"]):
        kind = block_name(name)
        final = i == n - 1
        head_arg = heads[i] if kind in K_BLOCKS or kind in SIMPLE_CROSS_ATTN_BLOCKS else rev_heads[i]
        in_ch, out_ch = rev[min(i + 1, n - 1)], rev[i]
        plans.append(
            BlockPlan(
                block_type=kind,
                in_channels=in_ch,
                out_channels=out_ch,
                prev_output_channel=rev[max(i - 1, 0)],
                num_layers=lpb[i] + 1,
                add_upsample=not final,
                only_cross_attention=bool(only_cross[i]),
                add_self_attention=kind == "KCrossAttnUpBlock2D" and in_ch == out_ch == temb,
                **_attention(
                    kind,
                    out_ch,
                    head_arg,
                    cross[i],
                    _layers_tuple(layers[i], lpb[i] + 1),
                    cfg.get("cross_attention_norm"),
                ),
                **_resnet_fields(cfg, kind, temb),
            )
        )
    return tuple(plans)


def _mid_plan(cfg: Mapping[str, Any], temb: int) -> BlockPlan | None:
    kind = cfg["mid_block_type"]
    if kind is None:
        return None
    channels = cfg["block_out_channels"][-1]
    n = len(cfg["block_out_channels"])
    fields = {
        **_resnet_fields(cfg, kind, temb),
        "norm_groups": cfg["norm_num_groups"] or min(channels // 4, 32),
        "output_scale_factor": cfg["mid_block_scale_factor"],
    }
    num_layers = 0 if kind == "UNetMidBlock2D" else 1  # attention layers; resnets = num_layers + 1
    layers = per_block(cfg, "transformer_layers_per_block", n)[-1]
    heads = per_block(cfg, "attention_head_dim", n)[-1]
    cross = per_block(cfg, "cross_attention_dim", n)[-1]
    return BlockPlan(
        block_type=kind,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        only_cross_attention=kind == "UNetMidBlock2DSimpleCrossAttn" and _mid_only_cross_attention(cfg),
        **_attention(kind, channels, heads, cross, _layers_tuple(layers, num_layers), cfg.get("cross_attention_norm")),
        **fields,
    )


def _mid_only_cross_attention(cfg: Mapping[str, Any]) -> bool:
    """diffusers: ``mid_block_only_cross_attention``, else a bool ``only_cross_attention``, else False."""
    value = cfg.get("mid_block_only_cross_attention")
    if value is None and isinstance(cfg["only_cross_attention"], bool):
        value = cfg["only_cross_attention"]
    return bool(value)


def unet_2d_condition_plan(cfg: Mapping[str, Any]) -> UNet2DConditionPlan:
    """Validate a full UNet2DConditionModel config and resolve it into per-block plans."""
    validate_unet_2d_condition_config(cfg)
    time = _time_plan(cfg)
    temb = time.embed_dim * (2 if time.class_concat else 1)
    channels = tuple(cfg["block_out_channels"])
    return UNet2DConditionPlan(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        conv_in_kernel=cfg["conv_in_kernel"],
        conv_out_kernel=cfg["conv_out_kernel"],
        block_out_channels=channels,
        time=time,
        encoder_hid_proj=_encoder_hid_proj(cfg),
        down=_down_plans(cfg, temb),
        mid=_mid_plan(cfg, temb),
        up=_up_plans(cfg, temb),
        norm_out_groups=cfg["norm_num_groups"],
        norm_eps=cfg["norm_eps"],
        act_fn=cfg["act_fn"],
        num_upsamplers=len(channels) - 1,
        center_input_sample=cfg["center_input_sample"],
        addition=addition_plan(cfg, time.embed_dim),
    )


def controlnet_plan(cfg: Mapping[str, Any]) -> ControlNetPlan:
    """Validate a full ControlNetModel config and resolve it into per-block plans."""
    validate_controlnet_config(cfg)
    time = _time_plan(cfg, controlnet=True)
    cfg = {**cfg, "dropout": 0.0, "reverse_transformer_layers_per_block": None}
    down = _down_plans(cfg, time.embed_dim)
    zero_convs = [down[0].in_channels]
    for block in down:
        zero_convs += [block.out_channels] * (block.num_layers + int(block.add_downsample))
    mid = _mid_plan(cfg, time.embed_dim)
    if mid is None:
        raise ValueError("mid_block_type: ControlNetModel needs a mid block")
    return ControlNetPlan(
        in_channels=cfg["in_channels"],
        conditioning_channels=cfg["conditioning_channels"],
        conditioning_embedding_out_channels=tuple(cfg["conditioning_embedding_out_channels"]),
        block_out_channels=tuple(cfg["block_out_channels"]),
        time=time,
        encoder_hid_proj=_encoder_hid_proj(cfg),
        down=down,
        mid=mid,
        controlnet_down_channels=tuple(zero_convs),
        flip_channels=cfg["controlnet_conditioning_channel_order"] == "bgr",
        global_pool_conditions=bool(cfg["global_pool_conditions"]),
        addition=addition_plan(cfg, time.embed_dim),
    )


def controlnet_residual_scales(num_down: int, conditioning_scale: float, guess_mode: bool) -> np.ndarray:
    """Float32 factors for the ``num_down`` down residuals and then the mid residual of a ControlNet.

    ``conditioning_scale`` everywhere, or in guess mode log-spaced from 0.1 (first skip) to 1.0 (mid)
    times it; diffusers skips the guess-mode ramp when ``global_pool_conditions`` is set (pass False then).
    """
    if num_down < 1:
        raise ValueError(f"num_down: expected >= 1 residuals, got {num_down}")
    if guess_mode:
        return np.logspace(-1, 0, num_down + 1, dtype=np.float32) * np.float32(conditioning_scale)
    return np.full(num_down + 1, conditioning_scale, dtype=np.float32)
