"""Down, up and middle blocks of the diffusers UNets (no cross-attention), in Flax NNX.

Each block is a stack of ``ResnetBlock2D`` (``resnets[i]``), optionally each followed by a
spatial self-attention (``attentions[i]``), then an optional resampler (``downsamplers[0]`` /
``upsamplers[0]``). Names and channel bookkeeping follow diffusers 0.42.1; tensors are NHWC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from backends.flax.models.layers import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D

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
    dtype: Any = jnp.float32  # parameter and computation dtype

    def resnet(self, in_channels: int, out_channels: int, rngs: nnx.Rngs, **kwargs: Any) -> ResnetBlock2D:
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
            rngs=rngs,
            dtype=self.dtype,
            **kwargs,
        )

    def attention(self, channels: int, head_dim: int | None, rngs: nnx.Rngs, **kwargs: Any) -> SpatialSelfAttention:
        """Self-attention normed with the resnet groups; ``head_dim=None`` means one head."""
        kwargs = {"norm_num_groups": self.groups, "eps": self.eps, **kwargs}
        return SpatialSelfAttention(channels, head_dim or channels, rngs=rngs, dtype=self.dtype, **kwargs)


def _check_resample_type(name: str, value: str) -> None:
    if value not in RESAMPLE_TYPES:
        raise ValueError(f"{name}: unsupported value {value!r}; accepted: {RESAMPLE_TYPES}")


def _resample(block: nnx.Module, hidden_states: jax.Array, temb: jax.Array) -> jax.Array:
    return block(hidden_states, temb) if isinstance(block, ResnetBlock2D) else block(hidden_states)


class DownBlock2D(nnx.Module):
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
        *,
        rngs: nnx.Rngs,
    ) -> None:
        _check_resample_type("downsample_type", downsample_type)
        self.attentions = (
            nnx.List([opts.attention(out_channels, attention_head_dim, rngs) for _ in range(num_layers)])
            if self.has_attention
            else None
        )
        self.resnets = nnx.List(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels, rngs) for i in range(num_layers)]
        )
        down: nnx.Module | None = None
        if add_downsample and downsample_type == "resnet":
            down = opts.resnet(out_channels, out_channels, rngs, down=True)
        elif add_downsample:
            down = Downsample2D(out_channels, True, out_channels, downsample_padding, rngs=rngs, dtype=opts.dtype)
        self.downsamplers = nnx.List([down]) if down is not None else None

    def __call__(self, hidden_states: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs: tuple[jax.Array, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = _resample(self.downsamplers[0], hidden_states, temb)
            outputs += (hidden_states,)
        return hidden_states, outputs


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a spatial self-attention after every resnet."""

    has_attention = True


class UpBlock2D(nnx.Module):
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
        *,
        rngs: nnx.Rngs,
    ) -> None:
        _check_resample_type("upsample_type", upsample_type)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(opts.resnet(resnet_in + skip_channels, out_channels, rngs))
        self.attentions = (
            nnx.List([opts.attention(out_channels, attention_head_dim, rngs) for _ in resnets])
            if self.has_attention
            else None
        )
        self.resnets = nnx.List(resnets)
        up: nnx.Module | None = None
        if add_upsample and upsample_type == "resnet":
            up = opts.resnet(out_channels, out_channels, rngs, up=True)
        elif add_upsample:
            up = Upsample2D(out_channels, True, out_channels, rngs=rngs, dtype=opts.dtype)
        self.upsamplers = nnx.List([up]) if up is not None else None

    def __call__(
        self, hidden_states: jax.Array, res_hidden_states: tuple[jax.Array, ...], temb: jax.Array
    ) -> jax.Array:
        skips = list(res_hidden_states)
        for i, resnet in enumerate(self.resnets):
            hidden_states = jnp.concatenate([hidden_states, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            hidden_states = _resample(self.upsamplers[0], hidden_states, temb)
        return hidden_states


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a spatial self-attention after every resnet."""

    has_attention = True


class UNetMidBlock2D(nnx.Module):
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
        *,
        rngs: nnx.Rngs,
    ) -> None:
        if attn_groups is None and opts.time_scale_shift == "default":
            attn_groups = opts.groups  # diffusers drops the attention norm under scale_shift
        attentions: list[SpatialSelfAttention | None] = [None] * num_layers
        if add_attention:
            head_dim = attention_head_dim or channels
            attentions = [
                opts.attention(
                    channels, head_dim, rngs, norm_num_groups=attn_groups, rescale_output_factor=output_scale_factor
                )
                for _ in range(num_layers)
            ]
        self.attentions = nnx.List(attentions)
        self.resnets = nnx.List(
            [
                opts.resnet(channels, channels, rngs, output_scale_factor=output_scale_factor)
                for _ in range(num_layers + 1)
            ]
        )

    def __call__(self, hidden_states: jax.Array, temb: jax.Array) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:], strict=True):
            if attn is not None:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states
