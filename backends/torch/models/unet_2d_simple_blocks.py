"""DeepFloyd IF / unCLIP blocks of UNet2DConditionModel in PyTorch: added-K/V attention and resnet resamplers.

``SimpleCrossAttnDownBlock2D`` / ``SimpleCrossAttnUpBlock2D`` / ``UNetMidBlock2DSimpleCrossAttn`` pair each
resnet with an ``AddedKVAttention`` (diffusers' ``Attention(added_kv_proj_dim=...)`` run by
``AttnAddedKVProcessor``): the feature map attends to the projected encoder tokens and, unless
``only_cross_attention``, to itself, in one softmax. Their resamplers are resnets that pool or
interpolate (``ResnetBlock2D(down=True / up=True)``), as in ``ResnetDownsampleBlock2D`` /
``ResnetUpsampleBlock2D``. Every block is built from a ``BlockPlan``; names follow diffusers 0.42.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.models.attention import AttentionContext, added_kv_mask_bias
from diffusion_core.models.model_config import CROSS_ATTENTION_NORM_GROUPS
from diffusion_core.models.unet_condition_config import BlockPlan
from diffusion_core.torch.models.unet_2d_blocks import ResnetOptions


class AddedKVAttention(nn.Module):
    """GroupNorm'd self-attention of a feature map whose keys/values also include the encoder tokens.

    Parameters (diffusers' names): ``group_norm``, optional ``norm_cross``, ``to_q``, ``to_k``/``to_v``
    (absent with ``only_cross_attention``), ``add_k_proj``/``add_v_proj`` of the encoder states, ``to_out.0``.
    """

    def __init__(self, plan: BlockPlan, channels: int) -> None:
        super().__init__()
        heads, head_dim, context_dim = plan.num_attention_heads, plan.attention_head_dim, plan.cross_attention_dim
        inner = heads * head_dim
        self.heads = heads
        self.only_cross_attention = plan.only_cross_attention
        self.group_norm = nn.GroupNorm(plan.norm_groups, channels, eps=1e-5)
        self.norm_cross: nn.Module | None = None
        if plan.cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(channels)  # the block width (the plan checks it equals context_dim)
        elif plan.cross_attention_norm == "group_norm":
            self.norm_cross = nn.GroupNorm(CROSS_ATTENTION_NORM_GROUPS, context_dim, eps=1e-5)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = self.to_v = None
        if not plan.only_cross_attention:
            self.to_k = nn.Linear(channels, inner)
            self.to_v = nn.Linear(channels, inner)
        self.add_k_proj = nn.Linear(context_dim, inner)
        self.add_v_proj = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        context = self._norm_context(ctx.encoder_hidden_states)  # (B, S, C_ctx)
        tokens = self.group_norm(hidden_states).reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        q = self._split_heads(self.to_q(tokens))  # (B, heads, HW, head_dim)
        k = self._split_heads(self.add_k_proj(context))  # (B, heads, S, head_dim)
        v = self._split_heads(self.add_v_proj(context))
        if self.to_k is not None:
            k = torch.cat([k, self._split_heads(self.to_k(tokens))], dim=2)  # (B, heads, S + HW, head_dim)
            v = torch.cat([v, self._split_heads(self.to_v(tokens))], dim=2)
        bias = added_kv_mask_bias(ctx, height * width, self.only_cross_attention)
        mask = None if bias is None else bias[:, None].to(q.dtype)  # (B, 1, 1, S [+ HW])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, HW, head_dim)
        out = out.transpose(1, 2).reshape(batch, height * width, -1)  # (B, HW, inner)
        out = self.to_out[1](self.to_out[0](out)).transpose(1, 2)  # (B, C, HW)
        return out.reshape(batch, channels, height, width) + hidden_states

    def _norm_context(self, context: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm_cross, nn.GroupNorm):
            return self.norm_cross(context.transpose(1, 2)).transpose(1, 2)  # groups over the channel axis
        return context if self.norm_cross is None else self.norm_cross(context)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)


def resnet_options(plan: BlockPlan) -> ResnetOptions:
    """Settings of a block's ResnetBlock2D stack (IF blocks: ``skip_time_act``, ``resnet_out_scale_factor``)."""
    if plan.norm_groups is None:
        raise ValueError(f"norm_num_groups: {plan.block_type} needs an int group count")
    return ResnetOptions(
        plan.temb_channels, plan.norm_groups, plan.norm_eps, plan.act_fn, plan.time_scale_shift, plan.dropout,
        skip_time_act=plan.skip_time_act, output_scale_factor=plan.output_scale_factor,
    )  # fmt: skip


class SimpleCrossAttnDownBlock2D(nn.Module):
    """``num_layers`` x (resnet, added-K/V attention), then a pooling resnet; every state is a skip."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        out = plan.out_channels
        self.attentions = nn.ModuleList(AddedKVAttention(plan, out) for _ in range(plan.num_layers))
        self.resnets = nn.ModuleList(
            opts.resnet(plan.in_channels if i == 0 else out, out) for i in range(plan.num_layers)
        )
        self.downsamplers = nn.ModuleList([opts.resnet(out, out, down=True)]) if plan.add_downsample else None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = attn(resnet(hidden_states, temb), ctx)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            outputs += (hidden_states,)
        return hidden_states, outputs


class SimpleCrossAttnUpBlock2D(nn.Module):
    """``num_layers`` x (concat one skip, resnet, added-K/V attention), then an interpolating resnet."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        out = plan.out_channels
        resnets = []
        for i in range(plan.num_layers):
            skip = plan.in_channels if i == plan.num_layers - 1 else out
            resnets.append(opts.resnet((plan.prev_output_channel if i == 0 else out) + skip, out))
        self.attentions = nn.ModuleList(AddedKVAttention(plan, out) for _ in resnets)
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([opts.resnet(out, out, up=True)]) if plan.add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        ctx: AttentionContext,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``upsample_size`` is ignored: a resnet upsampler always doubles H and W (as diffusers)."""
        skips = list(res_hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = attn(resnet(hidden_states, temb), ctx)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class UNetMidBlock2DSimpleCrossAttn(nn.Module):
    """resnet, then ``num_layers`` x (added-K/V attention, resnet) at the lowest resolution."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        channels = plan.out_channels
        self.attentions = nn.ModuleList(AddedKVAttention(plan, channels) for _ in range(plan.num_layers))
        self.resnets = nn.ModuleList(opts.resnet(channels, channels) for _ in range(plan.num_layers + 1))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(attn(hidden_states, ctx), temb)
        return hidden_states
