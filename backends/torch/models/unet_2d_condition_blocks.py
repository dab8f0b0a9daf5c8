"""Cross-attention and K-diffusion blocks of UNet2DConditionModel / ControlNetModel, in PyTorch.

Every block is built from a ``BlockPlan`` (diffusion_core.models.unet_condition_config), which
already resolved diffusers' per-block channel and head bookkeeping. Module and parameter names
follow diffusers 0.42.1 (``resnets.i``, ``attentions.i``, ``downsamplers.0``, ``upsamplers.0``).
Cross-attention blocks take ``(hidden, temb, context)``; the others ``(hidden, temb)``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_core.models import block_layout
from diffusion_core.models.attention import AttentionContext
from diffusion_core.models.unet_condition_config import BlockPlan
from diffusion_core.torch.models.attention import KAttentionBlock, Transformer2DModel
from diffusion_core.torch.models.layers import (
    Downsample2D,
    KDownsample2D,
    KUpsample2D,
    ResnetBlockCondNorm2D,
    Upsample2D,
)
from diffusion_core.torch.models.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from diffusion_core.torch.models.unet_2d_simple_blocks import (
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
    resnet_options,
)


def _transformer(plan: BlockPlan, num_layers: int) -> Transformer2DModel:
    return Transformer2DModel(**block_layout.transformer_kwargs(plan, num_layers))


def _attend(attn: Transformer2DModel, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    return attn(hidden_states, ctx.encoder_hidden_states, ctx.attention_mask, ctx.encoder_attention_mask)


class CrossAttnDownBlock2D(nn.Module):
    """``num_layers`` x (resnet, Transformer2DModel), then a stride-2 conv; every state is a skip."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        self.attentions = nn.ModuleList(_transformer(plan, n) for n in plan.transformer_layers)
        self.resnets = nn.ModuleList(
            opts.resnet(plan.in_channels if i == 0 else plan.out_channels, plan.out_channels)
            for i in range(plan.num_layers)
        )
        self.downsamplers = None
        if plan.add_downsample:
            conv = Downsample2D(plan.out_channels, True, plan.out_channels, padding=plan.downsample_padding)
            self.downsamplers = nn.ModuleList([conv])

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = _attend(attn, resnet(hidden_states, temb), ctx)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class CrossAttnUpBlock2D(nn.Module):
    """``num_layers`` x (concat one skip, resnet, Transformer2DModel), then 2x nearest + conv."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        resnets = []
        for i in range(plan.num_layers):
            skip = plan.in_channels if i == plan.num_layers - 1 else plan.out_channels
            resnet_in = plan.prev_output_channel if i == 0 else plan.out_channels
            resnets.append(opts.resnet(resnet_in + skip, plan.out_channels))
        self.attentions = nn.ModuleList(_transformer(plan, n) for n in plan.transformer_layers)
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = None
        if plan.add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(plan.out_channels, True, plan.out_channels)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        ctx: AttentionContext,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        skips = list(res_hidden_states)
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = _attend(attn, resnet(hidden_states, temb), ctx)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then ``num_layers`` x (Transformer2DModel, resnet) at the lowest resolution."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        opts = resnet_options(plan)
        self.attentions = nn.ModuleList(_transformer(plan, n) for n in plan.transformer_layers)
        self.resnets = nn.ModuleList(
            opts.resnet(plan.out_channels, plan.out_channels, output_scale_factor=plan.output_scale_factor)
            for _ in range(plan.num_layers + 1)
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(_attend(attn, hidden_states, ctx), temb)
        return hidden_states


class KDownBlock2D(nn.Module):
    """K-diffusion down block: ``num_layers`` AdaGroupNorm resnets (optional cross-attention), blur down.

    Skips are the resnet (attention) outputs; a block without a downsampler hands on None skips.
    """

    has_attention = False

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        layers = block_layout.k_down_layers(plan, self.has_attention)
        self.resnets = nn.ModuleList(ResnetBlockCondNorm2D(**resnet) for resnet, _ in layers)
        self.attentions = nn.ModuleList(KAttentionBlock(**attn) for _, attn in layers) if self.has_attention else None
        self.downsamplers = nn.ModuleList([KDownsample2D()]) if plan.add_downsample else None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, ctx: AttentionContext | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        outputs: tuple[torch.Tensor | None, ...] = ()
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
    """KDownBlock2D with a KAttentionBlock after every resnet."""

    has_attention = True


class KUpBlock2D(nn.Module):
    """K-diffusion up block: concat the last skip, ``num_layers - 1`` resnets (optional attention), blur up.

    The last resnet (and attention) narrows to ``in_channels``, the next block's width.
    """

    has_attention = False

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        layers = block_layout.k_up_layers(plan, self.has_attention)
        self.resnets = nn.ModuleList(ResnetBlockCondNorm2D(**resnet) for resnet, _ in layers)
        self.attentions = nn.ModuleList(KAttentionBlock(**attn) for _, attn in layers) if self.has_attention else None
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if plan.add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states: tuple[torch.Tensor | None, ...],
        temb: torch.Tensor,
        ctx: AttentionContext | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        skip = res_hidden_states[-1]
        if skip is not None:
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, 2C, H, W)
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
CROSS_ATTENTION_BLOCKS = (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
    KCrossAttnDownBlock2D,
    KCrossAttnUpBlock2D,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
)


def build_down_block(plan: BlockPlan) -> nn.Module:
    if plan.block_type in ("DownBlock2D", "ResnetDownsampleBlock2D"):
        resnet_down = plan.block_type == "ResnetDownsampleBlock2D"  # a pooling resnet instead of a strided conv
        return DownBlock2D(
            plan.in_channels,
            plan.out_channels,
            resnet_options(plan),
            num_layers=plan.num_layers,
            add_downsample=plan.add_downsample,
            downsample_padding=plan.downsample_padding,
            downsample_type="resnet" if resnet_down else "conv",
        )
    return DOWN_BLOCKS[plan.block_type](plan)


def build_up_block(plan: BlockPlan) -> nn.Module:
    if plan.block_type in ("UpBlock2D", "ResnetUpsampleBlock2D"):
        resnet_up = plan.block_type == "ResnetUpsampleBlock2D"  # an interpolating resnet instead of up + conv
        return UpBlock2D(
            plan.in_channels,
            plan.prev_output_channel,
            plan.out_channels,
            resnet_options(plan),
            num_layers=plan.num_layers,
            add_upsample=plan.add_upsample,
            upsample_type="resnet" if resnet_up else "conv",
        )
    return UP_BLOCKS[plan.block_type](plan)


def build_mid_block(plan: BlockPlan | None) -> nn.Module | None:
    if plan is None:
        return None
    if plan.block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(
            plan.out_channels,
            resnet_options(plan),
            num_layers=0,
            add_attention=False,
            output_scale_factor=plan.output_scale_factor,
        )
    if plan.block_type == "UNetMidBlock2DSimpleCrossAttn":
        return UNetMidBlock2DSimpleCrossAttn(plan)
    return UNetMidBlock2DCrossAttn(plan)
