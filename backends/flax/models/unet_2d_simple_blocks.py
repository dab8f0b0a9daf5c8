"""DeepFloyd IF / unCLIP blocks of UNet2DConditionModel in Flax NNX: added-K/V attention and resnet resamplers.

``SimpleCrossAttnDownBlock2D`` / ``SimpleCrossAttnUpBlock2D`` / ``UNetMidBlock2DSimpleCrossAttn`` pair each
resnet with an ``AddedKVAttention`` (diffusers' ``Attention(added_kv_proj_dim=...)`` run by
``AttnAddedKVProcessor``): the feature map attends to the projected encoder tokens and, unless
``only_cross_attention``, to itself, in one softmax. Their resamplers are resnets that pool or
interpolate. Built from ``BlockPlan``s; attribute names follow diffusers 0.42.1. Tensors are NHWC.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.flax.models.layers import (
    group_norm,
    layer_norm,
    linear,
    make_dropout,
    scaled_dot_product_attention,
)
from diffusion_core.flax.models.unet_2d_blocks import ResnetOptions
from diffusion_core.models.attention import AttentionContext, added_kv_mask_bias
from diffusion_core.models.model_config import CROSS_ATTENTION_NORM_GROUPS
from diffusion_core.models.unet_condition_config import BlockPlan


def resnet_options(plan: BlockPlan, dtype: Any) -> ResnetOptions:
    """Settings of a block's ResnetBlock2D stack (IF blocks: ``skip_time_act``, ``resnet_out_scale_factor``)."""
    if plan.norm_groups is None:
        raise ValueError(f"norm_num_groups: {plan.block_type} needs an int group count")
    return ResnetOptions(
        plan.temb_channels, plan.norm_groups, plan.norm_eps, plan.act_fn, plan.time_scale_shift, plan.dropout, dtype,
        skip_time_act=plan.skip_time_act, output_scale_factor=plan.output_scale_factor,
    )  # fmt: skip


class AddedKVAttention(nnx.Module):
    """GroupNorm'd self-attention of a feature map whose keys/values also include the encoder tokens.

    Attributes (diffusers' names): ``group_norm``, optional ``norm_cross``, ``to_q``, ``to_k``/``to_v``
    (absent with ``only_cross_attention``), ``add_k_proj``/``add_v_proj`` of the encoder states, ``to_out[0]``.
    """

    def __init__(self, plan: BlockPlan, channels: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        heads, head_dim, context_dim = plan.num_attention_heads, plan.attention_head_dim, plan.cross_attention_dim
        inner = heads * head_dim
        self.heads = heads
        self.only_cross_attention = plan.only_cross_attention
        self.group_norm = group_norm(channels, plan.norm_groups, 1e-5, rngs, dtype)
        norm_cross: nnx.Module | None = None
        if plan.cross_attention_norm == "layer_norm":
            norm_cross = layer_norm(channels, rngs, dtype)  # the block width (the plan checks it equals context)
        elif plan.cross_attention_norm == "group_norm":
            norm_cross = group_norm(context_dim, CROSS_ATTENTION_NORM_GROUPS, 1e-5, rngs, dtype)
        self.norm_cross = norm_cross
        self.to_q = linear(channels, inner, rngs, dtype)
        self.to_k = None if plan.only_cross_attention else linear(channels, inner, rngs, dtype)
        self.to_v = None if plan.only_cross_attention else linear(channels, inner, rngs, dtype)
        self.add_k_proj = linear(context_dim, inner, rngs, dtype)
        self.add_v_proj = linear(context_dim, inner, rngs, dtype)
        self.to_out = nnx.List([linear(inner, channels, rngs, dtype), make_dropout(0.0, rngs)])

    def __call__(self, hidden_states: jax.Array, ctx: AttentionContext) -> jax.Array:
        batch, height, width, channels = hidden_states.shape
        context = ctx.encoder_hidden_states  # (B, S, C_ctx); GroupNorm groups the last axis, as torch's on (B, C, S)
        context = context if self.norm_cross is None else self.norm_cross(context)
        tokens = self.group_norm(hidden_states).reshape(batch, height * width, channels)  # (B, HW, C)
        q = self._split_heads(self.to_q(tokens))  # (B, HW, heads, head_dim)
        k = self._split_heads(self.add_k_proj(context))  # (B, S, heads, head_dim)
        v = self._split_heads(self.add_v_proj(context))
        if self.to_k is not None:
            k = jnp.concatenate([k, self._split_heads(self.to_k(tokens))], axis=1)  # (B, S + HW, heads, head_dim)
            v = jnp.concatenate([v, self._split_heads(self.to_v(tokens))], axis=1)
        bias = added_kv_mask_bias(ctx, height * width, self.only_cross_attention)
        bias = None if bias is None else bias[:, None].astype(q.dtype)  # (B, 1, 1, S [+ HW])
        out = scaled_dot_product_attention(q, k, v, bias).reshape(batch, height * width, -1)  # (B, HW, inner)
        out = self.to_out[1](self.to_out[0](out))  # (B, HW, C)
        return out.reshape(batch, height, width, channels) + hidden_states

    def _split_heads(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1)  # (B, T, heads, head_dim)


class SimpleCrossAttnDownBlock2D(nnx.Module):
    """``num_layers`` x (resnet, added-K/V attention), then a pooling resnet; every state is a skip."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        opts, out = resnet_options(plan, dtype), plan.out_channels
        attentions = [AddedKVAttention(plan, out, rngs=rngs, dtype=dtype) for _ in range(plan.num_layers)]
        self.attentions = nnx.List(attentions)
        self.resnets = nnx.List(
            [opts.resnet(plan.in_channels if i == 0 else out, out, rngs) for i in range(plan.num_layers)]
        )
        self.downsamplers = nnx.List([opts.resnet(out, out, rngs, down=True)]) if plan.add_downsample else None

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, ctx: AttentionContext
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs: tuple[jax.Array, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = attn(resnet(hidden_states, temb), ctx)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            outputs += (hidden_states,)
        return hidden_states, outputs


class SimpleCrossAttnUpBlock2D(nnx.Module):
    """``num_layers`` x (concat one skip, resnet, added-K/V attention), then an interpolating resnet."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        opts, out = resnet_options(plan, dtype), plan.out_channels
        resnets = []
        for i in range(plan.num_layers):
            skip = plan.in_channels if i == plan.num_layers - 1 else out
            resnets.append(opts.resnet((plan.prev_output_channel if i == 0 else out) + skip, out, rngs))
        self.attentions = nnx.List([AddedKVAttention(plan, out, rngs=rngs, dtype=dtype) for _ in resnets])
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([opts.resnet(out, out, rngs, up=True)]) if plan.add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array, ...],
        temb: jax.Array,
        ctx: AttentionContext,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """``upsample_size`` is ignored: a resnet upsampler always doubles H and W (as diffusers)."""
        skips = list(res_hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = jnp.concatenate([hidden_states, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            hidden_states = attn(resnet(hidden_states, temb), ctx)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class UNetMidBlock2DSimpleCrossAttn(nnx.Module):
    """resnet, then ``num_layers`` x (added-K/V attention, resnet) at the lowest resolution."""

    def __init__(self, plan: BlockPlan, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        opts, channels = resnet_options(plan, dtype), plan.out_channels
        self.attentions = nnx.List(
            [AddedKVAttention(plan, channels, rngs=rngs, dtype=dtype) for _ in range(plan.num_layers)]
        )
        self.resnets = nnx.List([opts.resnet(channels, channels, rngs) for _ in range(plan.num_layers + 1)])

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, ctx: AttentionContext) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(attn(hidden_states, ctx), temb)
        return hidden_states
