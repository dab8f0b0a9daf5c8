"""Flax NNX ``AutoencoderKL``: the KL-regularised image autoencoder of latent diffusion.

Config fields and attribute names are those of diffusers 0.42.1's ``AutoencoderKL`` (and of
``diffusion_core.torch.models.vae``), so ``load_torch_state_dict`` fills it from a diffusers state
dict through the one converter in ``diffusion_core.weights.convert``. ``encode(x)`` returns a
``DiagonalGaussianDistribution``; ``decode(z)`` returns the image; posterior noise is passed
in. Sliced and tiled encode/decode use the framework-neutral math of
``diffusion_core.models.autoencoder``. NCHW at the boundary, NHWC inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models.layers import Downsample2D, ParamKeys, Upsample2D, conv, get_activation, group_norm
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.flax.models.unet_2d_blocks import ResnetOptions, UNetMidBlock2D
from diffusion_core.models import model_config
from diffusion_core.models.autoencoder import AutoencoderTiling

VAE_EPS = 1e-6  # GroupNorm epsilon of every VAE norm (diffusers hard-codes it)


def _to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


def _to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` time-free resnets, then an optional stride-2 conv (right/bottom padded)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 0,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.resnets = nnx.List(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels, rngs) for i in range(num_layers)]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, True, out_channels, downsample_padding, rngs=rngs, dtype=opts.dtype)])
            if add_downsample
            else None
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` time-free resnets, then an optional nearest 2x upsample and 3x3 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        opts: ResnetOptions,
        num_layers: int = 1,
        add_upsample: bool = True,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.resnets = nnx.List(
            [opts.resnet(in_channels if i == 0 else out_channels, out_channels, rngs) for i in range(num_layers)]
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, True, out_channels, rngs=rngs, dtype=opts.dtype)])
            if add_upsample
            else None
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class Encoder(nnx.Module):
    """Image (B, H, W, in) -> moments (B, H/2^(n-1), W/2^(n-1), 2*out or out), NHWC."""

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
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        ch = list(block_out_channels)
        opts = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn, dtype=dtype)
        self.conv_in = conv(in_channels, ch[0], 3, rngs, dtype)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)], ch[i], opts, layers_per_block, add_downsample=i < len(ch) - 1, rngs=rngs
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(ch[-1], opts, add_attention=mid_block_add_attention, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], norm_num_groups, VAE_EPS, rngs, dtype)
        self.conv_out = conv(ch[-1], 2 * out_channels if double_z else out_channels, 3, rngs, dtype)

    def __call__(self, sample: jax.Array) -> jax.Array:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample, None)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(sample)))


class Decoder(nnx.Module):
    """Latent (B, h, w, in) -> image (B, h*2^(n-1), w*2^(n-1), out), NHWC."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        rev = list(reversed(block_out_channels))
        opts = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn, dtype=dtype)
        self.conv_in = conv(in_channels, rev[0], 3, rngs, dtype)
        self.mid_block = UNetMidBlock2D(rev[0], opts, add_attention=mid_block_add_attention, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    rev[max(i - 1, 0)], rev[i], opts, layers_per_block + 1, add_upsample=i < len(rev) - 1, rngs=rngs
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = group_norm(rev[-1], norm_num_groups, VAE_EPS, rngs, dtype)
        self.conv_out = conv(rev[-1], out_channels, 3, rngs, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        sample = self.mid_block(self.conv_in(z), None)
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(sample)))


class AutoencoderKL(PretrainedMixin, AutoencoderTiling, nnx.Module):
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
        *,
        rngs: nnx.Rngs | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        cfg = {name: value for name, value in locals().items() if name in _CONFIG_FIELDS}
        model_config.validate_autoencoder_kl_config(cfg)
        get_activation(act_fn)
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        self.config = FrozenConfig(cfg)
        self.dtype = dtype
        shared = {
            "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups,
            "act_fn": act_fn,
            "mid_block_add_attention": mid_block_add_attention,
            "rngs": rngs,
            "dtype": dtype,
        }
        self.encoder = Encoder(in_channels, latent_channels, double_z=True, **shared)
        self.decoder = Decoder(latent_channels, out_channels, **shared)
        moments = 2 * latent_channels
        self.quant_conv = conv(moments, moments, 1, rngs, dtype, padding=0) if use_quant_conv else None
        self.post_quant_conv = (
            conv(latent_channels, latent_channels, 1, rngs, dtype, padding=0) if use_post_quant_conv else None
        )
        self._init_tiling(sample_size, len(block_out_channels))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> AutoencoderKL:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored.

        ``kwargs`` (``rngs``, ``dtype``) go to the constructor.
        """
        return cls(**model_config.init_kwargs_from_config(config, _CONFIG_FIELDS, "AutoencoderKL"), **kwargs)

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, noise: jax.Array | None = None) -> jax.Array:
        """Reconstruct ``sample``: decode the posterior mode, or ``mean + std * noise`` if ``sample_posterior``."""
        return self._reconstruct(sample, sample_posterior, noise)

    def _encode_tile(self, x: jax.Array) -> jax.Array:
        moments = self.encoder(_to_nhwc(x).astype(self.dtype))  # (B, h, w, 2 * latent_channels)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return _to_nchw(moments)  # (B, 2 * latent_channels, h, w)

    def _decode_tile(self, z: jax.Array) -> jax.Array:
        z = _to_nhwc(z).astype(self.dtype)  # (B, h, w, latent_channels)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return _to_nchw(self.decoder(z))  # (B, out_channels, H, W)

    @staticmethod
    def _as_nchw(name: str, value: Any, channels: int) -> jax.Array:
        """Return ``value`` as a jax array; raise a ValueError naming ``name`` unless it is (B, channels, H, W)."""
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(f"{name}: expected a (B, {channels}, H, W) array, got {shape or type(value).__name__}")
        return jnp.asarray(value)


_CONFIG_FIELDS = tuple(
    p for p in inspect.signature(AutoencoderKL.__init__).parameters if p not in ("self", "rngs", "dtype")
)
