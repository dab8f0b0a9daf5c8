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

from diffusion_core.flax.models.layers import (
    AdaGroupNorm,
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    conv,
    get_activation,
    make_dropout,
)

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
    skip_time_act: bool = False  # IF-style resnets: temb projected without the nonlinearity
    output_scale_factor: float = 1.0  # resnet output divided by this (config ``resnet_out_scale_factor``)

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
            skip_time_act=self.skip_time_act,
            rngs=rngs,
            dtype=self.dtype,
            **{"output_scale_factor": self.output_scale_factor, **kwargs},
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
        self,
        hidden_states: jax.Array,
        res_hidden_states: tuple[jax.Array, ...],
        temb: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """``upsample_size``: static (H', W') the conv upsampler resizes to (odd sizes in conditional UNets)."""
        skips = list(res_hidden_states)
        for i, resnet in enumerate(self.resnets):
            hidden_states = jnp.concatenate([hidden_states, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if isinstance(self.upsamplers, nnx.List) and isinstance(self.upsamplers[0], Upsample2D):
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        elif self.upsamplers is not None:
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


class ResnetBlockCondNorm2D(nnx.Module):
    """Residual block whose two norms are AdaGroupNorms of the time embedding (K-diffusion UNet)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        groups_out: int,
        eps: float = 1e-5,
        non_linearity: str = "gelu",
        conv_2d_out_channels: int | None = None,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        conv_out = conv_2d_out_channels or out_channels
        self.norm1 = AdaGroupNorm(temb_channels, in_channels, groups, eps, rngs=rngs, dtype=dtype)
        self.conv1 = conv(in_channels, out_channels, 3, rngs, dtype)
        self.norm2 = AdaGroupNorm(temb_channels, out_channels, groups_out, eps, rngs=rngs, dtype=dtype)
        self.dropout = make_dropout(dropout, rngs)
        self.conv2 = conv(out_channels, conv_out, 3, rngs, dtype)
        self.nonlinearity = get_activation(non_linearity)
        self.conv_shortcut = (
            conv(in_channels, conv_out, 1, rngs, dtype, padding=0, bias=False) if in_channels != conv_out else None
        )

    def __call__(self, input_tensor: jax.Array, temb: jax.Array) -> jax.Array:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor, temb)))
        hidden_states = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden_states, temb))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


_K_TAPS = (1 / 8, 3 / 8, 3 / 8, 1 / 8)  # the separable 4-tap (binomial) kernel of the K resamplers


def _k_kernel(channels: int, gain: float, dtype: Any) -> jax.Array:
    taps = jnp.asarray(_K_TAPS, jnp.float32) * gain
    kernel = jnp.outer(taps, taps).astype(dtype)  # (4, 4)
    return jnp.broadcast_to(kernel[:, :, None, None], (4, 4, 1, channels))  # depthwise HWIO


def _depthwise(x: jax.Array, kernel: jax.Array, stride: int, lhs_dilation: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((0, 0), (0, 0)),
        lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


class KDownsample2D(nnx.Module):
    """Halve H and W: reflect-pad 1, then a stride-2 depthwise 4x4 binomial filter (no weights)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # (B, H+2, W+2, C)
        return _depthwise(x, _k_kernel(x.shape[-1], 1.0, x.dtype), 2, 1)  # (B, H/2, W/2, C)


class KUpsample2D(nnx.Module):
    """Double H and W: reflect-pad 1, then a stride-2 transposed depthwise 4x4 binomial filter (no weights).

    torch's ``conv_transpose2d(stride=2, padding=3)`` with a 4x4 kernel is a valid convolution
    over the input dilated by 2 (the kernel is symmetric, so flipping it changes nothing).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # (B, H+2, W+2, C)
        return _depthwise(x, _k_kernel(x.shape[-1], 2.0, x.dtype), 1, 2)  # (B, 2H, 2W, C)
