"""PyTorch building blocks shared by the UNets and the VAE, named as diffusers names them.

Parameter names (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0``, ...) match
diffusers 0.42.1 so a diffusers state dict loads with ``load_state_dict(strict=True)``.
Dropout layers are kept for training; in ``eval()`` they are the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.models import timestep_embedding
from diffusion_core.models.model_config import TIME_SCALE_SHIFTS, activation_name

# diffusers' activations by canonical name (``model_config.activation_name`` checks and maps aliases)
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """Return a fresh activation module for a diffusers activation name."""
    return _ACTIVATIONS[activation_name(name)]()


class Timesteps(nn.Module):
    """Parameter-free sinusoidal timestep projection (diffusers ``Timesteps``)."""

    def __init__(
        self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a noise level (score SDE, Song et al. 2021); weight is frozen."""

    def __init__(
        self, embedding_size: int = 256, scale: float = 1.0, log: bool = True, flip_sin_to_cos: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        proj = x[:, None] * self.weight[None, :] * 2 * math.pi  # (B, embedding_size)
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)  # (B, 2 * embedding_size)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # (B, 2 * embedding_size)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on a timestep projection: ``linear_1 -> act -> linear_2 [-> post_act]``.

    With ``cond_proj_dim``, a bias-free ``cond_proj`` of an extra condition is added to the input.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None if cond_proj_dim is None else nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim if out_dim is None else out_dim)
        self.post_act = None if post_act_fn is None else get_activation(post_act_fn)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond: this model has no time_cond_proj_dim to project it")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return sample if self.post_act is None else self.post_act(sample)


class Downsample2D(nn.Module):
    """Halve H and W: stride-2 3x3 conv (``conv``) or, without a conv, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=padding)
        elif out_channels != channels:
            raise ValueError("Downsample2D: average pooling cannot change the channel count")
        else:
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))  # (B, C, H + 1, W + 1): asymmetric pad
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a time embedding added ("default") or as FiLM ("scale_shift")."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        up: bool = False,
        down: bool = False,
        skip_time_act: bool = False,
    ) -> None:
        super().__init__()
        if time_embedding_norm not in TIME_SCALE_SHIFTS:
            raise ValueError(
                f"resnet_time_scale_shift: unsupported value {time_embedding_norm!r}; accepted: {TIME_SCALE_SHIFTS}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act  # project temb as is (DeepFloyd IF), not through the nonlinearity
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            proj_dim = out_channels if time_embedding_norm == "default" else 2 * out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_dim)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample2D(in_channels)
        elif down:
            self.resample = Downsample2D(in_channels)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.resample is not None:
            input_tensor = self.resample(input_tensor)
            hidden_states = self.resample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None and temb is not None:
            temb = temb if self.skip_time_act else self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]  # (B, C or 2C, 1, 1)
        hidden_states = self._apply_time(hidden_states, temb)
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor

    def _apply_time(self, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """Add the projected embedding before ``norm2`` or use it as scale/shift after it."""
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            return self.norm2(hidden_states)
        if temb is None:
            raise ValueError("temb: required when resnet_time_scale_shift is 'scale_shift'")
        scale, shift = torch.chunk(temb, 2, dim=1)  # 2 x (B, C, 1, 1)
        return self.norm2(hidden_states) * (1 + scale) + shift


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    diffusers builds this as ``Attention(..., residual_connection=True,
    _from_deprecated_attn_block=True)``; the parameter names are the same.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        norm_num_groups: int | None = 32,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = channels // head_dim
        if self.heads < 1:
            raise ValueError(f"attention_head_dim: {head_dim} exceeds the channel count {channels}")
        inner_dim = self.heads * head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = None
        if norm_num_groups is not None:
            self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner_dim)
        self.to_k = nn.Linear(channels, inner_dim)
        self.to_v = nn.Linear(channels, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, channels), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        tokens = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        q, k, v = (self._split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
        out = out.transpose(1, 2).reshape(batch, height * width, -1)  # (B, HW, inner_dim)
        out = self.to_out[1](self.to_out[0](out))  # (B, HW, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return (out + residual) / self.rescale_output_factor

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1).transpose(1, 2)  # (B, heads, HW, head_dim)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine weights, scaled and shifted by a projection of the embedding."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class ResnetBlockCondNorm2D(nn.Module):
    """Residual block whose two norms are ``AdaGroupNorm`` of the embedding (K-diffusion UNet blocks).

    ``conv_2d_out_channels`` lets ``conv2`` (and the shortcut) change the width again.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        groups_out: int,
        eps: float = 1e-5,
        dropout: float = 0.0,
        non_linearity: str = "gelu",
        conv_2d_out_channels: int | None = None,
    ) -> None:
        super().__init__()
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.norm1 = AdaGroupNorm(temb_channels, in_channels, groups, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = AdaGroupNorm(temb_channels, out_channels, groups_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.conv_shortcut = None
        if in_channels != conv_2d_out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=False)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor, temb)))
        hidden_states = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden_states, temb))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


_K_KERNEL_1D = (1 / 8, 3 / 8, 3 / 8, 1 / 8)  # binomial blur of the K-diffusion resamplers


def _k_kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
    """Depthwise (C, 1, 4, 4) separable blur kernel for ``x``'s channels, times ``gain``."""
    k1 = torch.tensor(_K_KERNEL_1D, dtype=torch.float32, device=x.device) * gain
    return (k1[:, None] * k1[None, :]).to(x.dtype).expand(x.shape[1], 1, 4, 4)  # (C, 1, 4, 4)


class KDownsample2D(nn.Module):
    """Halve H and W: reflect pad 1, then a stride-2 depthwise 4x4 binomial blur (no parameters)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = F.pad(inputs, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
        return F.conv2d(inputs, _k_kernel(inputs, 1.0), stride=2, groups=inputs.shape[1])  # (B, C, H/2, W/2)


class KUpsample2D(nn.Module):
    """Double H and W: reflect pad 1, then a stride-2 depthwise transposed 4x4 blur (gain 2 per axis)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = F.pad(inputs, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
        kernel = _k_kernel(inputs, 2.0)
        return F.conv_transpose2d(inputs, kernel, stride=2, padding=3, groups=inputs.shape[1])  # (B, C, 2H, 2W)
