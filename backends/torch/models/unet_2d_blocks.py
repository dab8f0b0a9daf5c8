"""Down, up and middle blocks of the diffusers UNets (no cross-attention), in PyTorch.

Each block is a stack of ``ResnetBlock2D`` (``resnets.i``), optionally each followed by a
spatial self-attention (``attentions.i``), then an optional resampler (``downsamplers.0`` /
``upsamplers.0``). Names and channel bookkeeping follow diffusers 0.42.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffusion_core.torch.models.layers import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D

RESAMPLE_TYPES = ("conv", "resnet")


@dataclass(frozen=True)
class ResnetOptions:
    """Settings every ResnetBlock2D (and attention norm) of a UNet shares."""

    temb_channels: int | None  # width of the time embedding fed to each resnet
    groups: int  # GroupNorm groups (config ``norm_num_groups``)
    eps: float = 1e-5  # GroupNorm epsilon (config ``norm_eps``)
    act_fn: str = "silu"  # resnet nonlinearity (config ``act_fn``)
    time_scale_shift: str = "default"  # "default": add temb; "scale_shift": FiLM after norm2
    dropout: float = 0.0  # inside each resnet, before conv2
    skip_time_act: bool = False  # IF-style resnets: temb projected without the nonlinearity
    output_scale_factor: float = 1.0  # resnet output divided by this (config ``resnet_out_scale_factor``)

    def resnet(self, in_channels: int, out_channels: int, **kwargs: object) -> ResnetBlock2D:
        """Build a ResnetBlock2D with these settings (kwargs: output_scale_factor, up, down)."""
        return ResnetBlock2D(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=self.temb_channels,
            groups=self.groups,
            eps=self.eps,
            dropout=self.dropout,
            non_linearity=self.act_fn,
            time_embedding_norm=self.time_scale_shift,
            skip_time_act=self.skip_time_act,
            **{"output_scale_factor": self.output_scale_factor, **kwargs},
        )

    def attention(self, channels: int, head_dim: int | None) -> SpatialSelfAttention:
        """Self-attention normed with the resnet groups; ``head_dim=None`` means one head."""
        return SpatialSelfAttention(channels, head_dim or channels, norm_num_groups=self.groups, eps=self.eps)


def _check_resample_type(name: str, value: str) -> None:
    if value not in RESAMPLE_TYPES:
        raise ValueError(f"{name}: unsupported value {value!r}; accepted: {RESAMPLE_TYPES}")


class DownBlock2D(nn.Module):
    """``num_layers`` resnets, then a stride-2 conv; returns every intermediate for the skips."""

    has_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        attention_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_resample_type("downsample_type", downsample_type)
        self.attentions = None  # registered before resnets, as diffusers does (state-dict order)
        if self.has_attention:
            self.attentions = nn.ModuleList(opts.attention(out_channels, attention_head_dim) for _ in range(num_layers))
        self.resnets = nn.ModuleList(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.downsamplers = None
        if add_downsample and downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([opts.resnet(out_channels, out_channels, down=True)])
        elif add_downsample:
            conv = Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)
            self.downsamplers = nn.ModuleList([conv])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            hidden_states = down(hidden_states, temb) if isinstance(down, ResnetBlock2D) else down(hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a spatial self-attention after every resnet."""

    has_attention = True


class UpBlock2D(nn.Module):
    """``num_layers`` resnets, each fed the running state concatenated with one skip, then 2x up."""

    has_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        add_upsample: bool = True,
        upsample_type: str = "conv",
        attention_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_resample_type("upsample_type", upsample_type)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(opts.resnet(resnet_in + skip_channels, out_channels))
        self.attentions = None  # registered before resnets, as diffusers does (state-dict order)
        if self.has_attention:
            self.attentions = nn.ModuleList(opts.attention(out_channels, attention_head_dim) for _ in resnets)
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = None
        if add_upsample and upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([opts.resnet(out_channels, out_channels, up=True)])
        elif add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``upsample_size``: output (H, W) of a conv upsampler, for sizes not divisible by 2."""
        skips = list(res_hidden_states)
        for i, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            hidden_states = (
                up(hidden_states, temb) if isinstance(up, ResnetBlock2D) else up(hidden_states, upsample_size)
            )
        return hidden_states


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a spatial self-attention after every resnet."""

    has_attention = True


class UNetMidBlock2D(nn.Module):
    """resnet, then ``num_layers`` x (attention, resnet) at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        attention_head_dim: int | None = None,
        attn_groups: int | None = None,
        add_attention: bool = True,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if attn_groups is None and opts.time_scale_shift == "default":
            attn_groups = opts.groups  # diffusers drops the attention norm under scale_shift
        attentions: list[nn.Module | None] = [None] * num_layers
        if add_attention:
            head_dim = attention_head_dim or channels
            attentions = [
                SpatialSelfAttention(channels, head_dim, attn_groups, opts.eps, output_scale_factor)
                for _ in range(num_layers)
            ]
        self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(
            [opts.resnet(channels, channels, output_scale_factor=output_scale_factor) for _ in range(num_layers + 1)]
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            if attn is not None:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states
