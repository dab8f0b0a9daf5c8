"""Cross-attention blocks of UNet2DConditionModel in Flax NNX: SD blocks and the K-UNet blocks.

SD blocks (``CrossAttnDownBlock2D``, ``CrossAttnUpBlock2D``, ``UNetMidBlock2DCrossAttn``) put a
``Transformer2DModel`` (``attentions[i]``) after every resnet. The K-blocks of the x2 latent
upscaler use ``ResnetBlockCondNorm2D`` and ``KAttentionBlock`` and fixed-filter resamplers.
Names follow diffusers 0.42.1; tensors are NHWC.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)
from diffusion_core.models.unet_condition_config import BlockPlan

K_GROUP_SIZE = 32  # channels per GroupNorm group in the K-UNet blocks (diffusers' fixed resnet_group_size)


@dataclass(frozen=True)
class TransformerOptions:
    """Settings of the Transformer2DModels of one UNet block."""

    num_attention_heads: int
    attention_head_dim: int  # channels per head (heads x head dim may be below the block width)
    cross_attention_dim: int  # width of encoder_hidden_states
    layers: tuple[int, ...]  # transformer layers after each resnet of the block
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def build(self, channels: int, index: int, opts: ResnetOptions, rngs: nnx.Rngs) -> Transformer2DModel:
        return Transformer2DModel(
            self.num_attention_heads,
            self.attention_head_dim,
            channels,
            num_layers=self.layers[index],
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=opts.groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
            rngs=rngs,
            dtype=opts.dtype,
        )


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after every resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: ResnetOptions,
        transformer: TransformerOptions,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(in_channels, out_channels, opts, num_layers, add_downsample, downsample_padding, rngs=rngs)
        attentions = nnx.List([transformer.build(out_channels, i, opts, rngs) for i in range(num_layers)])
        self.attentions = nnx.data(attentions)  # the base class set it to (static) None

    def __call__(
        self,
        hidden_states: jax.Array,
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_bias: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs: tuple[jax.Array, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states, encoder_attention_bias)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after every resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        opts: ResnetOptions,
        transformer: TransformerOptions,
        num_layers: int = 1,
        add_upsample: bool = True,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(in_channels, prev_output_channel, out_channels, opts, num_layers, add_upsample, rngs=rngs)
        attentions = nnx.List([transformer.build(out_channels, i, opts, rngs) for i in range(num_layers)])
        self.attentions = nnx.data(attentions)  # the base class set it to (static) None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_bias: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = list(res_hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = jnp.concatenate([hidden_states, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states, encoder_attention_bias)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then ``num_layers`` x (Transformer2DModel, resnet) at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        opts: ResnetOptions,
        transformer: TransformerOptions,
        num_layers: int = 1,
        output_scale_factor: float = 1.0,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.attentions = nnx.List([transformer.build(channels, i, opts, rngs) for i in range(num_layers)])
        self.resnets = nnx.List(
            [
                opts.resnet(channels, channels, rngs, output_scale_factor=output_scale_factor)
                for _ in range(num_layers + 1)
            ]
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_bias: jax.Array | None = None,
    ) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:], strict=True):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states, encoder_attention_bias), temb)
        return hidden_states


@dataclass(frozen=True)
class KOptions:
    """Settings every K-UNet block shares."""

    temb_channels: int  # width of the time embedding
    eps: float = 1e-5  # AdaGroupNorm epsilon of the resnets (config ``norm_eps``)
    act_fn: str = "gelu"
    cross_attention_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def resnet(self, in_ch: int, out_ch: int, rngs: nnx.Rngs, conv_out: int | None = None) -> ResnetBlockCondNorm2D:
        return ResnetBlockCondNorm2D(
            in_channels=in_ch,
            out_channels=out_ch,
            temb_channels=self.temb_channels,
            groups=in_ch // K_GROUP_SIZE,
            groups_out=out_ch // K_GROUP_SIZE,
            eps=self.eps,
            non_linearity=self.act_fn,
            conv_2d_out_channels=conv_out,
            dropout=self.dropout,
            rngs=rngs,
            dtype=self.dtype,
        )

    def attention(
        self, dim: int, head_dim: int, add_self_attention: bool, upcast: bool, rngs: nnx.Rngs
    ) -> KAttentionBlock:
        return KAttentionBlock(
            dim, dim // head_dim, head_dim, self.cross_attention_dim, self.temb_channels,
            add_self_attention=add_self_attention, upcast_attention=upcast, group_size=K_GROUP_SIZE,
            rngs=rngs, dtype=self.dtype,
        )  # fmt: skip


class KDownBlock2D(nnx.Module):
    """``num_layers`` K resnets (each output kept as a skip), then an optional fixed-filter 2x downsample."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: KOptions,
        num_layers: int = 4,
        add_downsample: bool = False,
        attention_head_dim: int = 64,
        add_self_attention: bool = False,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.resnets = nnx.List(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels, rngs) for i in range(num_layers)]
        )
        self.attentions = (
            nnx.List(
                [
                    opts.attention(out_channels, attention_head_dim, add_self_attention, False, rngs)
                    for _ in range(num_layers)
                ]
            )
            if self.has_cross_attention
            else None
        )
        self.downsamplers = nnx.List([KDownsample2D()]) if add_downsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_bias: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
        outputs: tuple[jax.Array | None, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states, temb, encoder_attention_bias)
                # the cross-attention block without a downsampler feeds no skip (the first K up block takes none)
                outputs += (hidden_states if self.downsamplers is not None else None,)
            else:
                outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states, outputs


class KCrossAttnDownBlock2D(KDownBlock2D):
    """KDownBlock2D with a KAttentionBlock after every resnet (self-attention too in the last block)."""

    has_cross_attention = True


class KUpBlock2D(nnx.Module):
    """Concat the last skip (if any), ``num_layers - 1`` K resnets [+ KAttentionBlocks], optional 2x upsample.

    The first cross block (``add_self_attention``) takes no skip and self-attends too; a block
    whose ``in != out`` ends with a conv to ``in_channels`` (the K-UNet's channel bookkeeping).
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: KOptions,
        num_layers: int = 5,
        add_upsample: bool = True,
        attention_head_dim: int = 1,
        upcast_attention: bool = False,
        add_self_attention: bool = False,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        first = add_self_attention  # the first cross block (in == out == temb channels) takes no skip
        k_in = out_channels if first else 2 * out_channels
        count = num_layers - 1
        resnets, attentions = [], []
        for i in range(count):
            last = i == count - 1
            if self.has_cross_attention:
                conv_out = in_channels if last and in_channels != out_channels else None
                resnets.append(opts.resnet(k_in if i == 0 else out_channels, out_channels, rngs, conv_out))
                dim = in_channels if last else out_channels
                attentions.append(opts.attention(dim, attention_head_dim, first, upcast_attention, rngs))
            else:
                resnets.append(
                    opts.resnet(k_in if i == 0 else out_channels, in_channels if last else out_channels, rngs)
                )
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if self.has_cross_attention else None
        self.upsamplers = nnx.List([KUpsample2D()]) if add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array | None, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_bias: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skip = res_hidden_states[-1]
        if skip is not None:
            hidden_states = jnp.concatenate([hidden_states, skip], axis=-1)  # (B, H, W, 2C)
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states, temb, encoder_attention_bias)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class KCrossAttnUpBlock2D(KUpBlock2D):
    """KUpBlock2D with a KAttentionBlock after every resnet."""

    has_cross_attention = True


def _resnet_options(plan: BlockPlan, dtype: Any) -> ResnetOptions:
    return ResnetOptions(
        plan.temb_channels, plan.norm_groups, plan.norm_eps, plan.act_fn, plan.time_scale_shift, plan.dropout, dtype
    )


def _transformer_options(plan: BlockPlan) -> TransformerOptions:
    return TransformerOptions(
        plan.num_attention_heads,
        plan.attention_head_dim,
        plan.cross_attention_dim,
        tuple(plan.transformer_layers),
        plan.use_linear_projection,
        plan.only_cross_attention,
        plan.upcast_attention,
    )


def _k_options(plan: BlockPlan, dtype: Any) -> KOptions:
    return KOptions(plan.temb_channels, plan.norm_eps, plan.act_fn, plan.cross_attention_dim, plan.dropout, dtype)


def build_down_block(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
    """The down block a resolved plan describes."""
    kind, layers = plan.block_type, plan.num_layers
    if kind in ("KDownBlock2D", "KCrossAttnDownBlock2D"):
        block_cls = KCrossAttnDownBlock2D if kind == "KCrossAttnDownBlock2D" else KDownBlock2D
        return block_cls(
            plan.in_channels, plan.out_channels, _k_options(plan, dtype), layers, plan.add_downsample,
            plan.attention_head_dim or 1, plan.add_self_attention, rngs=rngs,
        )  # fmt: skip
    opts = _resnet_options(plan, dtype)
    if kind == "CrossAttnDownBlock2D":
        return CrossAttnDownBlock2D(
            plan.in_channels, plan.out_channels, opts, _transformer_options(plan), layers, plan.add_downsample,
            plan.downsample_padding, rngs=rngs,
        )  # fmt: skip
    return DownBlock2D(
        plan.in_channels, plan.out_channels, opts, layers, plan.add_downsample, plan.downsample_padding, rngs=rngs
    )


def build_up_block(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
    """The up block a resolved plan describes (``num_layers`` counts the skips it consumes)."""
    kind, layers = plan.block_type, plan.num_layers
    if kind in ("KUpBlock2D", "KCrossAttnUpBlock2D"):
        block_cls = KCrossAttnUpBlock2D if kind == "KCrossAttnUpBlock2D" else KUpBlock2D
        return block_cls(
            plan.in_channels, plan.out_channels, _k_options(plan, dtype), layers, plan.add_upsample,
            plan.attention_head_dim or 1, plan.upcast_attention, plan.add_self_attention, rngs=rngs,
        )  # fmt: skip
    opts = _resnet_options(plan, dtype)
    prev = plan.prev_output_channel
    if kind == "CrossAttnUpBlock2D":
        return CrossAttnUpBlock2D(
            plan.in_channels, prev, plan.out_channels, opts, _transformer_options(plan), layers, plan.add_upsample,
            rngs=rngs,
        )  # fmt: skip
    return UpBlock2D(plan.in_channels, prev, plan.out_channels, opts, layers, plan.add_upsample, rngs=rngs)


def build_mid_block(plan: BlockPlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
    """``UNetMidBlock2DCrossAttn``, or the single-resnet ``UNetMidBlock2D`` diffusers builds for conditional UNets."""
    opts = _resnet_options(plan, dtype)
    if plan.block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2DCrossAttn(
            plan.in_channels, opts, _transformer_options(plan), plan.num_layers, plan.output_scale_factor, rngs=rngs
        )
    return UNetMidBlock2D(
        plan.in_channels, opts, num_layers=0, add_attention=False, output_scale_factor=plan.output_scale_factor,
        rngs=rngs,
    )  # fmt: skip
