"""PyTorch ``AutoencoderKL``: the KL-regularised image autoencoder of latent diffusion.

Config fields, module names and state-dict keys are those of diffusers 0.42.1's
``AutoencoderKL``, so a diffusers state dict loads with ``load_state_dict(strict=True)``.
``encode(x)`` returns a ``DiagonalGaussianDistribution``; ``decode(z)`` returns the image.
Sampling the posterior takes the noise tensor from the caller (randomness is passed in).
Sliced (per-image) and tiled (overlapping tiles, linearly blended) encode/decode bound
memory on large batches and images and give the same numbers as diffusers'. The posterior
and the tile blending are framework-neutral and live in ``diffusion_core.models.autoencoder``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import model_config
from diffusion_core.models.autoencoder import AutoencoderTiling
from diffusion_core.torch.models.layers import Downsample2D, Upsample2D, get_activation
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.torch.models.unet_2d_blocks import ResnetOptions, UNetMidBlock2D

VAE_EPS = 1e-6  # GroupNorm epsilon of every VAE norm (diffusers hard-codes it)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` time-free resnets, then an optional stride-2 conv (right/bottom padded)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.downsamplers = None
        if add_downsample:
            conv = Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)
            self.downsamplers = nn.ModuleList([conv])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` time-free resnets, then an optional nearest 2x upsample and 3x3 conv."""

    def __init__(
        self, in_channels: int, out_channels: int, opts: ResnetOptions, num_layers: int = 1, add_upsample: bool = True
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*out or out, H/2^(n-1), W/2^(n-1))."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        channels = list(block_out_channels)
        opts = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn)
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], opts, layers_per_block, add_downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = UNetMidBlock2D(channels[-1], opts, add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[-1], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latent (B, in, h, w) -> image (B, out, h*2^(n-1), w*2^(n-1))."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        rev = list(reversed(block_out_channels))
        opts = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn)
        self.conv_in = nn.Conv2d(in_channels, rev[0], kernel_size=3, padding=1)
        self.up_blocks = nn.ModuleList(  # before mid_block: diffusers' state-dict order
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], opts, layers_per_block + 1, add_upsample=i < len(rev) - 1)
            for i in range(len(rev))
        )
        self.mid_block = UNetMidBlock2D(rev[0], opts, add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, rev[-1], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(z), None)
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class AutoencoderKL(PretrainedMixin, AutoencoderTiling, nn.Module):
    """VAE with a diagonal-Gaussian latent (Kingma & Welling 2014; Rombach et al. 2022)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        cfg = {name: value for name, value in locals().items() if name in _CONFIG_FIELDS}
        model_config.validate_autoencoder_kl_config(cfg)
        get_activation(act_fn)
        self.config = FrozenConfig(cfg)
        shared = {
            "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups,
            "act_fn": act_fn,
            "mid_block_add_attention": mid_block_add_attention,
        }
        self.encoder = Encoder(in_channels, latent_channels, double_z=True, **shared)
        self.decoder = Decoder(latent_channels, out_channels, **shared)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self._init_tiling(sample_size, len(block_out_channels))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AutoencoderKL:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**model_config.init_kwargs_from_config(config, _CONFIG_FIELDS, "AutoencoderKL"))

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def forward(
        self, sample: torch.Tensor, sample_posterior: bool = False, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reconstruct ``sample``: decode the posterior mode, or ``mean + std * noise`` if ``sample_posterior``."""
        return self._reconstruct(sample, sample_posterior, noise)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2 * latent_channels, h, w)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @staticmethod
    def _as_nchw(name: str, value: torch.Tensor, channels: int) -> torch.Tensor:
        """Return ``value``; raise a ValueError naming ``name`` unless it is a (B, channels, H, W) tensor."""
        if not torch.is_tensor(value) or value.ndim != 4 or value.shape[1] != channels:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name}: expected a (B, {channels}, H, W) tensor, got {shape}")
        return value


_CONFIG_FIELDS = tuple(p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self")
