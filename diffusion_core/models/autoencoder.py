"""Framework-neutral VAE math: the diagonal-Gaussian posterior and tiled, blended encode/decode.

Written once against the array-API namespace of its inputs, so the torch and flax
``AutoencoderKL`` share it (numpy, torch or jax arrays; eager or traced). Randomness is
passed in: ``sample(noise)`` takes the standard-normal draw from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from diffusion_core.arrays import host_to_like, namespace

LOGVAR_RANGE = (-30.0, 20.0)  # log-variance clamp that keeps exp() finite


class DiagonalGaussianDistribution:
    """Posterior N(mean, diag(std^2)) read from encoder moments (B, 2C, H, W) = [mean; logvar]."""

    def __init__(self, parameters: Any, deterministic: bool = False) -> None:
        shape = tuple(getattr(parameters, "shape", ()))
        if len(shape) != 4 or shape[1] % 2:
            raise ValueError(f"parameters: expected (B, 2C, H, W) moments, got shape {shape}")
        xp = namespace(parameters)
        half = shape[1] // 2
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean = parameters[:, :half, ...]  # (B, C, H, W)
        self.logvar = xp.clip(parameters[:, half:, ...], *LOGVAR_RANGE)  # (B, C, H, W)
        if deterministic:
            self.std = self.var = xp.zeros_like(self.mean)
        else:
            self.std = xp.exp(0.5 * self.logvar)
            self.var = xp.exp(self.logvar)

    def sample(self, noise: Any) -> Any:
        """Reparameterised draw ``mean + std * noise``; ``noise`` is standard normal, shaped as ``mean``."""
        got = tuple(getattr(noise, "shape", ()))
        if got != tuple(self.mean.shape):
            raise ValueError(f"noise: expected an array of shape {tuple(self.mean.shape)}, got {got}")
        xp = namespace(self.mean)
        device = None if array_api_compat.is_jax_array(self.mean) else array_api_compat.device(self.mean)
        return self.mean + self.std * xp.asarray(noise, dtype=self.mean.dtype, device=device)

    def mode(self) -> Any:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Any:
        """KL(self || other) per batch item, shape (B,); ``other=None`` is the standard normal."""
        xp = namespace(self.mean)
        if self.deterministic:
            return xp.zeros_like(self.mean[:, 0, 0, 0])
        if other is None:
            terms = self.mean**2 + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * xp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample: Any, dims: tuple[int, ...] = (1, 2, 3)) -> Any:
        """Negative log-likelihood of ``sample`` summed over ``dims``."""
        xp = namespace(self.mean)
        if self.deterministic:
            return xp.zeros_like(self.mean[:, 0, 0, 0])
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var
        return 0.5 * xp.sum(terms, axis=tuple(dims))


def blend(prev: Any, tile: Any, extent: int, axis: int) -> Any:
    """Linear cross-fade of ``prev``'s trailing ``extent`` rows/cols into ``tile``'s leading ones."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    xp = namespace(tile)
    ramp = np.arange(extent, dtype=np.float64) / extent  # host weights in float64, cast once
    shape = [1] * tile.ndim
    shape[axis] = extent
    keep = xp.reshape(host_to_like(1.0 - ramp, tile), shape)
    take = xp.reshape(host_to_like(ramp, tile), shape)
    prev_tail = prev[_span(axis, prev.shape[axis] - extent, None)]
    head = prev_tail * keep + tile[_span(axis, 0, extent)] * take
    return xp.concat([head, tile[_span(axis, extent, None)]], axis=axis)


def _span(axis: int, start: int, stop: int | None) -> tuple[slice, ...]:
    """Index tuple selecting ``start:stop`` along ``axis`` (all of the axes before it)."""
    return (slice(None),) * axis + (slice(start, stop),)


def tiled_apply(x: Any, fn: Callable[[Any], Any], in_tile: int, out_tile: int, overlap: float) -> Any:
    """Apply ``fn`` to overlapping ``in_tile`` squares of ``x`` (B, C, H, W), blend neighbours, stitch.

    Tiles start every ``int(in_tile * (1 - overlap))`` pixels; each output tile (``out_tile``
    wide) is cross-faded over ``int(out_tile * overlap)`` rows/cols with the already blended
    tile above and to its left, then cropped to ``out_tile - blend`` before concatenation.
    """
    stride = int(in_tile * (1 - overlap))
    if in_tile < 1 or out_tile < 1 or stride < 1:
        raise ValueError(
            f"tile_overlap_factor: {overlap} with tile sizes ({in_tile}, {out_tile}) gives no forward step; "
            "use tile sizes >= 1 and 0 <= tile_overlap_factor < 1"
        )
    extent = int(out_tile * overlap)
    limit = out_tile - extent
    rows: list[list[Any]] = []
    for top in range(0, x.shape[2], stride):
        row: list[Any] = []
        for left in range(0, x.shape[3], stride):
            tile = fn(x[:, :, top : top + in_tile, left : left + in_tile])
            if rows:
                tile = blend(rows[-1][len(row)], tile, extent, axis=2)
            if row:
                tile = blend(row[-1], tile, extent, axis=3)
            row.append(tile)
        rows.append(row)
    xp = namespace(rows[0][0])
    stitched = [xp.concat([t[:, :, :limit, :limit] for t in row], axis=3) for row in rows]  # (B, C, limit, W')
    return xp.concat(stitched, axis=2)  # (B, C, H', W')


class AutoencoderTiling:
    """Slicing, tiling and posterior handling of ``AutoencoderKL``, shared by both backends.

    A backend's model mixes this in and provides three primitives: ``_encode_tile(x)`` (NCHW
    images -> NCHW moments), ``_decode_tile(z)`` (NCHW latents -> NCHW images) and
    ``_as_nchw(name, value, channels)`` (validate and return a (B, channels, H, W) array), plus
    ``config`` with ``in_channels`` and ``latent_channels``.
    """

    def _init_tiling(self, sample_size: Any, num_blocks: int) -> None:
        """Tiling defaults as diffusers sets them: one tile is one training-size image."""
        self.use_slicing = False
        self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / 2 ** (num_blocks - 1))
        self.tile_overlap_factor = 0.25

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

    def encode(self, x: Any) -> DiagonalGaussianDistribution:
        """Images (B, in_channels, H, W) -> posterior over latents (B, latent_channels, H/f, W/f)."""
        x = self._as_nchw("x", x, self.config["in_channels"])
        return DiagonalGaussianDistribution(self._per_item(x, self._encode))  # moments (B, 2C, h, w)

    def decode(self, z: Any) -> Any:
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        z = self._as_nchw("z", z, self.config["latent_channels"])
        return self._per_item(z, self._decode)

    def tiled_encode(self, x: Any) -> DiagonalGaussianDistribution:
        """Encode with tiles regardless of size (``tile_sample_min_size`` pixel tiles)."""
        x = self._as_nchw("x", x, self.config["in_channels"])
        return DiagonalGaussianDistribution(self._tiled_moments(x))

    def tiled_decode(self, z: Any) -> Any:
        """Decode with tiles regardless of size (``tile_latent_min_size`` latent tiles)."""
        z = self._as_nchw("z", z, self.config["latent_channels"])
        return tiled_apply(
            z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor
        )

    def _reconstruct(self, sample: Any, sample_posterior: bool, noise: Any) -> Any:
        """Decode the posterior mode, or ``mean + std * noise`` if ``sample_posterior`` (the forward pass)."""
        if not sample_posterior and noise is not None:
            raise ValueError("noise: only used with sample_posterior=True")
        if sample_posterior and noise is None:
            raise ValueError("noise: required when sample_posterior=True (standard normal, shaped as the latents)")
        posterior = self.encode(sample)
        return self.decode(posterior.sample(noise) if sample_posterior else posterior.mode())

    def _per_item(self, x: Any, fn: Callable[[Any], Any]) -> Any:
        """``fn(x)``, or one batch item at a time when slicing is on."""
        if self.use_slicing and x.shape[0] > 1:
            return namespace(x).concat([fn(x[i : i + 1]) for i in range(x.shape[0])], axis=0)
        return fn(x)

    def _encode(self, x: Any) -> Any:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_moments(x)
        return self._encode_tile(x)

    def _decode(self, z: Any) -> Any:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self.tiled_decode(z)
        return self._decode_tile(z)

    def _tiled_moments(self, x: Any) -> Any:
        return tiled_apply(
            x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        )
