"""Flax NNX ``AutoencoderKL``: the KL-regularised image autoencoder of latent diffusion.

Config fields and attribute names are those of diffusers 0.42.1's ``AutoencoderKL`` (and of
``backends.torch.models.vae``), so ``load_torch_state_dict`` fills it from a diffusers state
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

from backends.flax.models.layers import Downsample2D, Upsample2D, conv, get_activation, group_norm
from backends.flax.models.modeling import PretrainedMixin
from backends.flax.models.unet_2d_blocks import ResnetOptions, UNetMidBlock2D
from diffusion_core.models import model_config
from diffusion_core.models.autoencoder import DiagonalGaussianDistribution, tiled_apply

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


class AutoencoderKL(PretrainedMixin, nnx.Module):
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
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config: dict[str, Any] = cfg
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
        self.use_slicing = False
        self.use_tiling = False
        # Tiling defaults as diffusers sets them: one tile is one training-size image.
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> AutoencoderKL:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored.

        ``kwargs`` (``rngs``, ``dtype``) go to the constructor.
        """
        return cls(**model_config.init_kwargs_from_config(config, _CONFIG_FIELDS, "AutoencoderKL"), **kwargs)

    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time (same numbers, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Encode/decode inputs larger than one tile as overlapping, blended tiles."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
        """Images (B, in_channels, H, W) -> posterior over latents (B, latent_channels, H/f, W/f)."""
        x = _check_nchw("x", x, self.config["in_channels"])
        if self.use_slicing and x.shape[0] > 1:
            moments = jnp.concatenate([self._encode(x[i : i + 1]) for i in range(x.shape[0])])  # (B, 2C, h, w)
        else:
            moments = self._encode(x)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        z = _check_nchw("z", z, self.config["latent_channels"])
        if self.use_slicing and z.shape[0] > 1:
            return jnp.concatenate([self._decode(z[i : i + 1]) for i in range(z.shape[0])])
        return self._decode(z)

    def tiled_encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
        """Encode with tiles regardless of size (``tile_sample_min_size`` pixel tiles)."""
        x = _check_nchw("x", x, self.config["in_channels"])
        return DiagonalGaussianDistribution(self._tiled_moments(x))

    def tiled_decode(self, z: jax.Array) -> jax.Array:
        """Decode with tiles regardless of size (``tile_latent_min_size`` latent tiles)."""
        z = _check_nchw("z", z, self.config["latent_channels"])
        return tiled_apply(
            z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor
        )

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, noise: jax.Array | None = None) -> jax.Array:
        """Reconstruct ``sample``: decode the posterior mode, or ``mean + std * noise`` if ``sample_posterior``."""
        if not sample_posterior and noise is not None:
            raise ValueError("noise: only used with sample_posterior=True")
        if sample_posterior and noise is None:
            raise ValueError("noise: required when sample_posterior=True (standard normal, shaped as the latents)")
        posterior = self.encode(sample)
        return self.decode(posterior.sample(noise) if sample_posterior else posterior.mode())

    def _encode(self, x: jax.Array) -> jax.Array:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_moments(x)
        return self._encode_tile(x)

    def _decode(self, z: jax.Array) -> jax.Array:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self.tiled_decode(z)
        return self._decode_tile(z)

    def _tiled_moments(self, x: jax.Array) -> jax.Array:
        return tiled_apply(
            x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        )

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


def _check_nchw(name: str, value: Any, channels: int) -> jax.Array:
    """Return ``value`` as a jax array; raise a ValueError naming ``name`` unless it is (B, channels, H, W)."""
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"{name}: expected a (B, {channels}, H, W) array, got {shape or type(value).__name__}")
    return jnp.asarray(value)


_CONFIG_FIELDS = tuple(
    p for p in inspect.signature(AutoencoderKL.__init__).parameters if p not in ("self", "rngs", "dtype")
)
