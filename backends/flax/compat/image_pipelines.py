"""diffusers 0.39's Flax image-conditioned pipelines (ControlNet, img2img, inpaint) over our native ones.

Each maps 0.39's call (token ids, preprocessed NCHW images, ``params``, ``prng_seed``, ``jit``) onto the
native pipeline's public ``__call__`` through ``FlaxStableDiffusionPipeline._generate``. Every draw is 0.39's
(per device key under ``jit=True``), so a ``prng_seed`` gives the image 0.39 gave:

- img2img: ``noise = normal(key, (B, C, h, w))``, then the posterior noise ``normal(key, (B, h, w, C))`` from the
  *same* key (0.39 sampled its channels-last posterior with ``prng_seed`` again), transposed to (B, C, h, w);
- inpaint: ``latents = normal(key, (B, C, h, w))``, then ``_, mask_key = split(key)`` and the masked image's
  posterior noise ``normal(mask_key, (B, h, w, C))``, transposed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_core.flax import pipelines as native_pipelines
from diffusion_core.flax.compat.pipelines import FlaxStableDiffusionPipeline, guidance_value, unshard
from diffusion_core.pipelines import stable_diffusion as sd


class FlaxStableDiffusionControlNetPipeline(FlaxStableDiffusionPipeline):
    """0.39's ``FlaxStableDiffusionControlNetPipeline`` over the native ``StableDiffusionControlNetPipeline``."""

    _native_class = native_pipelines.StableDiffusionControlNetPipeline

    def prepare_text_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """(B, 77) token ids (0.39's ``prepare_text_inputs``)."""
        return self.prepare_inputs(prompt)

    def prepare_image_inputs(self, image: Any) -> np.ndarray:
        """PIL image(s) -> (B, 3, H, W) float32 in [0, 1] (0.39's ``prepare_image_inputs``)."""
        images = image if isinstance(image, list) else [image]
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]  # (H, W, 3) each
        return np.stack(arrays).transpose(0, 3, 1, 2)

    def __call__(
        self,
        prompt_ids: Any,
        image: Any,
        params: dict,
        prng_seed: Any,
        num_inference_steps: int = 50,
        guidance_scale: float | Any = 7.5,
        latents: Any = None,
        neg_prompt_ids: Any = None,
        controlnet_conditioning_scale: float | Any = 1.0,
        return_dict: bool = True,
        jit: bool = False,
    ):
        """Generate images following the (B, 3, H, W) control ``image`` (sharded under ``jit=True``)."""
        control = unshard(image, "image", jit)[0]
        if control.ndim != 4 or control.shape[1] != 3:
            raise ValueError(f"image: expected (B, 3, H, W) from prepare_image_inputs, got shape {control.shape}")
        calls = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents)
        size = (int(control.shape[2]), int(control.shape[3]))
        scale = guidance_value(controlnet_conditioning_scale, "controlnet_conditioning_scale")
        return self._generate(
            prompt_ids, params, prng_seed, size, neg_prompt_ids, jit, return_dict, calls,
            image=np.ascontiguousarray(control.transpose(0, 2, 3, 1)), controlnet_conditioning_scale=scale,
        )  # fmt: skip


class FlaxStableDiffusionImg2ImgPipeline(FlaxStableDiffusionPipeline):
    """0.39's ``FlaxStableDiffusionImg2ImgPipeline`` over the native ``StableDiffusionImg2ImgPipeline``.

    The start noise is 0.39's draw (``normal(prng_seed, ...)``, or ``noise=``), and so is the VAE posterior
    sample's noise (:func:`posterior_noise_039`).
    """

    _native_class = native_pipelines.StableDiffusionImg2ImgPipeline
    _native_sized = False

    def prepare_inputs(self, prompt: str | list[str], image: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids (B, 77), images (B, 3, H, W) in [-1, 1])``; sizes rounded down to multiples of 32, as 0.39."""
        images = image if isinstance(image, list) else [image]
        if len(images) != len(sd.prompt_texts(prompt)):
            raise ValueError(f"image: got {len(images)} images for {len(sd.prompt_texts(prompt))} prompts")
        return super().prepare_inputs(prompt), np.stack([_pil_to_signed(im) for im in images])

    def __call__(
        self,
        prompt_ids: Any,
        image: Any,
        params: dict,
        prng_seed: Any,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | Any = 7.5,
        noise: Any = None,
        neg_prompt_ids: Any = None,
        return_dict: bool = True,
        jit: bool = False,
    ):
        """Repaint the (B, 3, H, W) ``image`` in [-1, 1] toward the prompts (sharded under ``jit=True``)."""
        pixels = unshard(image, "image", jit)[0]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"image: expected (B, 3, H, W) in [-1, 1] from prepare_inputs, got shape {pixels.shape}")
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"height, width: must match the image's size {size}, got {(height, width)}")
        calls = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=noise)
        shape = (pixels.shape[0], int(self.native.vae.config["latent_channels"]), *self._latent_hw(size))
        return self._generate(
            prompt_ids, params, prng_seed, size, neg_prompt_ids, jit, return_dict, calls,
            image=np.ascontiguousarray(((pixels + 1) / 2).transpose(0, 2, 3, 1)), strength=strength,
            posterior_noise=posterior_noise_039(prng_seed, shape, jit, split=False), key=_first_key(prng_seed, jit),
        )  # fmt: skip


class FlaxStableDiffusionInpaintPipeline(FlaxStableDiffusionPipeline):
    """0.39's ``FlaxStableDiffusionInpaintPipeline`` over the native ``StableDiffusionInpaintPipeline``.

    Starts from 0.39's draw ``normal(prng_seed, (B, latent_channels, h, w))`` (or ``latents=``) at full strength;
    the masked image's VAE posterior noise is 0.39's too (:func:`posterior_noise_039`, after a split).
    """

    _native_class = native_pipelines.StableDiffusionInpaintPipeline

    def _latent_channels(self) -> int:
        return int(self.native.vae.config["latent_channels"])

    def prepare_inputs(self, prompt: str | list[str], image: Any, mask: Any) -> tuple[np.ndarray, ...]:
        """``(token ids (B, 77), masked images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W) of 0/1)``, as 0.39."""
        images = image if isinstance(image, list) else [image]
        masks = mask if isinstance(mask, list) else [mask]
        if not len(images) == len(masks) == len(sd.prompt_texts(prompt)):
            raise ValueError(f"image, mask: need one each per prompt, got {len(images)} and {len(masks)}")
        pixels = np.stack([_pil_to_signed(im) for im in images])  # (B, 3, H, W)
        binary = np.stack([_pil_to_mask(m) for m in masks])  # (B, 1, H, W)
        return super().prepare_inputs(prompt), pixels * (binary < 0.5), binary

    def __call__(
        self,
        prompt_ids: Any,
        mask: Any,
        masked_image: Any,
        params: dict,
        prng_seed: Any,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | Any = 7.5,
        latents: Any = None,
        neg_prompt_ids: Any = None,
        return_dict: bool = True,
        jit: bool = False,
    ):
        """Repaint where ``mask`` (B, 1, H, W) is 1 in ``masked_image`` (B, 3, H, W), in [-1, 1]."""
        pixels = unshard(masked_image, "masked_image", jit)[0]
        binary = unshard(mask, "mask", jit)[0]
        if pixels.ndim != 4 or pixels.shape[1] != 3 or binary.shape != (pixels.shape[0], 1, *pixels.shape[2:]):
            raise ValueError(
                f"masked_image, mask: expected (B, 3, H, W) and (B, 1, H, W), got {pixels.shape}, {binary.shape}"
            )
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"height, width: must match the image's size {size}, got {(height, width)}")
        calls = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents)
        shape = (pixels.shape[0], self._latent_channels(), *self._latent_hw(size))
        return self._generate(
            prompt_ids, params, prng_seed, size, neg_prompt_ids, jit, return_dict, calls,
            image=np.ascontiguousarray(((pixels + 1) / 2).transpose(0, 2, 3, 1)),
            mask_image=np.ascontiguousarray(binary.transpose(0, 2, 3, 1)), strength=1.0,
            posterior_noise=posterior_noise_039(prng_seed, shape, jit, split=True), key=_first_key(prng_seed, jit),
        )  # fmt: skip


def _first_key(prng_seed: Any, jit: bool) -> Any:
    """The key the native call gets for its other draws (step noise of stochastic schedulers): device 0's."""
    return jnp.asarray(prng_seed)[0] if jit else prng_seed


def posterior_noise_039(prng_seed: Any, shape: tuple[int, ...], jit: bool, split: bool) -> np.ndarray:
    """0.39's VAE posterior noise (B, C, h, w): ``normal(key, (b, h, w, C))`` transposed to channels-first, with
    ``key = split(k)[1]`` when ``split`` (inpaint) else ``k`` itself (img2img); under ``jit`` one draw of
    ``b = B / n`` per device key ``k``, else ``b = B`` from ``prng_seed``."""
    keys = jnp.asarray(prng_seed)[None] if not jit else jnp.asarray(prng_seed)
    per_key = (shape[0] // keys.shape[0], shape[2], shape[3], shape[1])  # (b, h, w, C), 0.39's channels-last
    draws = []
    for key in keys:
        draw_key = jax.random.split(key)[1] if split else key
        draws.append(np.asarray(jax.random.normal(draw_key, per_key, dtype=jnp.float32)).transpose(0, 3, 1, 2))
    return np.concatenate(draws)


def _pil_to_mask(mask: Any) -> np.ndarray:
    """A PIL mask -> (1, H, W) float32 of 0/1 (white = repaint), resized to multiples of 32 (0.39's preprocess_mask)."""
    from PIL import Image

    w, h = (x - x % 32 for x in mask.size)
    values = np.asarray(mask.convert("L").resize((w, h), resample=Image.NEAREST), dtype=np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)[None]


def _pil_to_signed(image: Any) -> np.ndarray:
    """A PIL image -> (3, H, W) float32 in [-1, 1], cropped to multiples of 32 by resizing (0.39's ``preprocess``)."""
    from PIL import Image

    w, h = (x - x % 32 for x in image.size)
    pixels = np.asarray(image.convert("RGB").resize((w, h), resample=Image.LANCZOS), dtype=np.float32) / 255.0
    return 2.0 * pixels.transpose(2, 0, 1) - 1.0
