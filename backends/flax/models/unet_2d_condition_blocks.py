"""Cross-attention and K-diffusion blocks of UNet2DConditionModel / ControlNetModel, in Flax NNX.

Every block is built from a ``BlockPlan`` (diffusion_core.models.unet_condition_config), which
already resolved diffusers' per-block channel and head bookkeeping; the per-layer arguments come
from ``diffusion_core.models.block_layout``, as in the torch backend. Module and parameter names
follow diffusers 0.42.1 (``resnets[i]``, ``attentions[i]``, ``downsamplers[0]``, ``upsamplers[0]``).
Cross-attention blocks take ``(hidden, temb, ctx)``; the others ``(hidden, temb)``. Tensors are NHWC.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.flax.models.attention import KAttentionBlock, Transformer2DModel
from diffusion_core.flax.models.unet_2d_blocks import (
    DownBlock2D,
    KDownsample2D,
    KUpsample2D,
    ResnetBlockCondNorm2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from diffusion_core.flax.models.unet_2d_simple_blocks import (
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
    resnet_options,
)
from diffusion_core.models import block_layout
from diffusion_core.models.attention import AttentionContext
from diffusion_core.models.unet_condition_config import BlockPlan


def _transformers(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.List:
    kwargs = [block_layout.transformer_kwargs(plan, n) for n in plan.transformer_layers]
    return nnx.List([Transformer2DModel(**kw, rngs=rngs, dtype=dtype) for kw in kwargs])


def _attend(attn: Transformer2DModel, hidden_states: jax.Array, ctx: AttentionContext) -> jax.Array:
    return attn(hidden_states, ctx.encoder_hidden_states, ctx.attention_mask, ctx.encoder_attention_mask)


class CrossAttnDownBlock2D(DownBlock2D):
    """``num_layers`` x (resnet, Transformer2DModel), then a stride-2 conv; every state is a skip."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        super().__init__(
            plan.in_channels, plan.out_channels, resnet_options(plan, dtype), plan.num_layers, plan.add_downsample,
            plan.downsample_padding, rngs=rngs,
        )  # fmt: skip
        self.attentions = nnx.data(_transformers(plan, rngs, dtype))  # the base class set it to (static) None

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, ctx: AttentionContext
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs: tuple[jax.Array, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = _attend(attn, resnet(hidden_states, temb), ctx)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class CrossAttnUpBlock2D(UpBlock2D):
    """``num_layers`` x (concat one skip, resnet, Transformer2DModel), then 2x nearest + conv."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        super().__init__(
            plan.in_channels, plan.prev_output_channel, plan.out_channels, resnet_options(plan, dtype),
            plan.num_layers, plan.add_upsample, rngs=rngs,
        )  # fmt: skip
        self.attentions = nnx.data(_transformers(plan, rngs, dtype))  # the base class set it to (static) None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array, ...],
        temb: jax.Array,
        ctx: AttentionContext,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = list(res_hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = jnp.concatenate([hidden_states, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            hidden_states = _attend(attn, resnet(hidden_states, temb), ctx)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then ``num_layers`` x (Transformer2DModel, resnet) at the lowest resolution."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        opts, channels = resnet_options(plan, dtype), plan.out_channels
        self.attentions = _transformers(plan, rngs, dtype)
        self.resnets = nnx.List(
            [
                opts.resnet(channels, channels, rngs, output_scale_factor=plan.output_scale_factor)
                for _ in range(plan.num_layers + 1)
            ]
        )

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, ctx: AttentionContext) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:], strict=True):
            hidden_states = resnet(_attend(attn, hidden_states, ctx), temb)
        return hidden_states


def _k_layers(layers: list, has_attention: bool, rngs: nnx.Rngs, dtype: Any) -> tuple[nnx.List, nnx.List | None]:
    """(resnets, attentions or None) from ``block_layout``'s per-layer keyword dicts."""
    resnets = nnx.List([ResnetBlockCondNorm2D(**resnet, rngs=rngs, dtype=dtype) for resnet, _ in layers])
    if not has_attention:
        return resnets, None
    return resnets, nnx.List([KAttentionBlock(**attn, rngs=rngs, dtype=dtype) for _, attn in layers])


class KDownBlock2D(nnx.Module):
    """K-diffusion down block: ``num_layers`` AdaGroupNorm resnets (optional cross-attention), blur down.

    Skips are the resnet (attention) outputs; a cross block without a downsampler hands on None skips.
    """

    has_attention = False

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        layers = block_layout.k_down_layers(plan, self.has_attention)
        self.resnets, self.attentions = _k_layers(layers, self.has_attention, rngs, dtype)
        self.downsamplers = nnx.List([KDownsample2D()]) if plan.add_downsample else None

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, ctx: AttentionContext | None = None
    ) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
        outputs: tuple[jax.Array | None, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, temb, ctx)
                outputs += (hidden_states if self.downsamplers is not None else None,)
            else:
                outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states, outputs


class KCrossAttnDownBlock2D(KDownBlock2D):
    """KDownBlock2D with a KAttentionBlock after every resnet (self-attention too in the last block)."""

    has_attention = True


class KUpBlock2D(nnx.Module):
    """K-diffusion up block: concat the last skip (if any), ``num_layers - 1`` resnets [+ attention], blur up.

    The last resnet (and attention) narrows to ``in_channels``, the next block's width.
    """

    has_attention = False

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        layers = block_layout.k_up_layers(plan, self.has_attention)
        self.resnets, self.attentions = _k_layers(layers, self.has_attention, rngs, dtype)
        self.upsamplers = nnx.List([KUpsample2D()]) if plan.add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array | None, ...],
        temb: jax.Array,
        ctx: AttentionContext | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skip = res_hidden_states[-1]
        if skip is not None:
            hidden_states = jnp.concatenate([hidden_states, skip], axis=-1)  # (B, H, W, 2C)
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, temb, ctx)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class KCrossAttnUpBlock2D(KUpBlock2D):
    """KUpBlock2D with a KAttentionBlock after every resnet."""

    has_attention = True


DOWN_BLOCKS = {
    "CrossAttnDownBlock2D": CrossAttnDownBlock2D,
    "KDownBlock2D": KDownBlock2D,
    "KCrossAttnDownBlock2D": KCrossAttnDownBlock2D,
    "SimpleCrossAttnDownBlock2D": SimpleCrossAttnDownBlock2D,
}
UP_BLOCKS = {
    "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
    "KUpBlock2D": KUpBlock2D,
    "KCrossAttnUpBlock2D": KCrossAttnUpBlock2D,
    "SimpleCrossAttnUpBlock2D": SimpleCrossAttnUpBlock2D,
}


def build_down_block(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
    """The down block a resolved plan describes."""
    if plan.block_type in ("DownBlock2D", "ResnetDownsampleBlock2D"):
        kind = "resnet" if plan.block_type == "ResnetDownsampleBlock2D" else "conv"  # pooling resnet or strided conv
        return DownBlock2D(
            plan.in_channels, plan.out_channels, resnet_options(plan, dtype), plan.num_layers, plan.add_downsample,
            plan.downsample_padding, kind, rngs=rngs,
        )  # fmt: skip
    return DOWN_BLOCKS[plan.block_type](plan, rngs=rngs, dtype=dtype)


def build_up_block(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
    """The up block a resolved plan describes (``num_layers`` counts the skips it consumes)."""
    if plan.block_type in ("UpBlock2D", "ResnetUpsampleBlock2D"):
        kind = "resnet" if plan.block_type == "ResnetUpsampleBlock2D" else "conv"  # interpolating resnet or up + conv
        return UpBlock2D(
            plan.in_channels, plan.prev_output_channel, plan.out_channels, resnet_options(plan, dtype),
            plan.num_layers, plan.add_upsample, kind, rngs=rngs,
        )  # fmt: skip
    return UP_BLOCKS[plan.block_type](plan, rngs=rngs, dtype=dtype)


def build_mid_block(plan: BlockPlan | None, rngs: nnx.Rngs, dtype: Any) -> nnx.Module | None:
    """``UNetMidBlock2DCrossAttn``, or the single-resnet ``UNetMidBlock2D`` diffusers builds for conditional UNets."""
    if plan is None:
        return None
    if plan.block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(
            plan.out_channels, resnet_options(plan, dtype), num_layers=0, add_attention=False,
            output_scale_factor=plan.output_scale_factor, rngs=rngs,
        )  # fmt: skip
    if plan.block_type == "UNetMidBlock2DSimpleCrossAttn":
        return UNetMidBlock2DSimpleCrossAttn(plan, rngs=rngs, dtype=dtype)
    return UNetMidBlock2DCrossAttn(plan, rngs=rngs, dtype=dtype)
