"""Image inputs of the image-conditioned Stable Diffusion pipelines (img2img, inpaint, InstructPix2Pix), once.

Host-side preprocessing (PIL / numpy -> (B, C, H, W) float32 numpy, as diffusers' ``VaeImageProcessor``),
where an img2img/inpaint run starts (``strength``) and how the start latents are formed. The backends
run the VAE and draw the noise; the array functions take any namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import conditioning
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.image import normalize, pil_to_numpy, resize_pil

__all__ = [
    "check_latent_upscaler_call",
    "check_unet_channels",
    "inpaint_extra",
    "keep_known_region",
    "pix2pix_extra",
    "image_batch",
    "inpaint_inputs",
    "noised_start",
    "preprocess_control_image",
    "preprocess_image",
    "preprocess_mask",
    "require_image",
    "start_state",
    "strength_start",
    "upscaler_max_noise_level",
    "upscaler_vae_config",
    "UPSCALER_SCALING_FACTOR",
    "DEFAULT_MAX_NOISE_LEVEL",
]

# diffusers' x4 upscaler always decodes with this VAE scaling factor (it rewrites other values in the config).
UPSCALER_SCALING_FACTOR = 0.08333
DEFAULT_MAX_NOISE_LEVEL = 350  # the x4 upscaler's max_noise_level when its model_index does not set one


def _to_nhwc(
    image: Any, name: str, height: int | None, width: int | None, scale: int, mode: str, resample: str = "lanczos"
) -> np.ndarray:
    """PIL image(s) or a numpy (H, W[, C]) / (B, H, W, C) array in [0, 1] -> (B, H, W, C) float32 sized to
    ``height``/``width`` (default: the input size rounded down to a multiple of ``scale``)."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else None
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        pil = list(image)
    if pil is not None:
        first = pil if isinstance(pil, Image.Image) else pil[0]
        h = height or first.height - first.height % scale
        w = width or first.width - first.width % scale
        ims = [pil] if isinstance(pil, Image.Image) else pil
        ims = [im.convert(mode) for im in ims]
        if (first.height, first.width) != (h, w):
            ims = resize_pil(ims, h, w, resample)
        return pil_to_numpy(ims)
    arr = np.asarray(image) if isinstance(image, np.ndarray) else None
    if arr is None or arr.dtype.kind != "f" or arr.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must be a PIL image, a list of them, or a float numpy array in [0, 1] (H, W, C)")
    arr = arr[None, ..., None] if arr.ndim == 2 else (arr[None] if arr.ndim == 3 else arr)  # (B, H, W, C)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name}: numpy images must hold values in [0, 1], got [{arr.min()}, {arr.max()}]")
    h, w = arr.shape[1], arr.shape[2]
    want = (height or h - h % scale, width or w - w % scale)
    if (h, w) != want:
        raise ValueError(f"{name}: numpy images must be {want[0]}x{want[1]} (height x width), got {h}x{w}")
    return arr.astype(np.float32)


def preprocess_image(
    image: Any, scale: int, height: int | None = None, width: int | None = None, resample: str = "lanczos"
) -> np.ndarray:
    """An RGB image input -> (B, 3, H, W) float32 in [-1, 1] (``resample``-resized PIL; numpy must be sized)."""
    nhwc = _to_nhwc(image, "image", height, width, scale, "RGB", resample)
    if nhwc.shape[-1] != 3:
        raise ValueError(f"image must have 3 channels (RGB), got {nhwc.shape[-1]}")
    return normalize(np.transpose(nhwc, (0, 3, 1, 2)))


def preprocess_control_image(image: Any, scale: int, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A ControlNet conditioning image -> (B, 3, H, W) float32 in [0, 1] (RGB, not normalized)."""
    nhwc = _to_nhwc(image, "image", height, width, scale, "RGB")
    if nhwc.shape[-1] != 3:
        raise ValueError(f"image must have 3 channels (RGB), got {nhwc.shape[-1]}")
    return np.ascontiguousarray(np.transpose(nhwc, (0, 3, 1, 2)))


def preprocess_mask(mask: Any, scale: int, height: int, width: int) -> np.ndarray:
    """An inpainting mask (white/1 = repaint) -> (B, 1, H, W) float32 binarized at 0.5."""
    nhwc = _to_nhwc(mask, "mask_image", height, width, scale, "L")
    if nhwc.shape[-1] != 1:
        raise ValueError(f"mask_image must have one channel, got {nhwc.shape[-1]}")
    return conditioning.binarize_mask(np.transpose(nhwc, (0, 3, 1, 2)))


def require_image(value: Any, name: str) -> Any:
    """``value``, checked to be given: the image inputs a pipeline cannot run without."""
    if value is None:
        raise ValueError(f"{name}: this pipeline needs it (a PIL image, a list of them, or a numpy array in [0, 1])")
    return value


def inpaint_inputs(
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    image: Any,
    mask_image: Any,
    size: tuple[int | None, int | None],
    schedule: tuple[Any, int, float],
    pipeline: str,
) -> tuple[bool, tuple[int, int], np.ndarray, np.ndarray]:
    """The inpaint pipeline's checks and host inputs: ``(blend, (height, width), pixels, mask)``.

    ``blend`` is True for a text-to-image (4-channel) UNet, which keeps the known region after each step; other
    UNets must take the mask and masked-image latents as extra channels. ``schedule`` is ``(scheduler,
    num_inference_steps, strength)``, checked before any VAE work.
    """
    channels = int(vae_config["latent_channels"])
    blend = int(unet_config["in_channels"]) == channels
    if not blend:
        check_unet_channels(unet_config, channels, 1 + channels, pipeline)
    height, width = sd.resolve_size(size[0], size[1], unet_config, vae_config)
    scale = sd.vae_scale_factor(vae_config)
    pixels = preprocess_image(require_image(image, "image"), scale, height, width)
    mask = preprocess_mask(require_image(mask_image, "mask_image"), scale, height, width)
    strength_start(*schedule)
    return blend, (height, width), pixels, mask


def image_batch(latents: Any, batch_size: int, name: str = "image") -> Any:
    """Encoded images tiled to the generation batch (b -> batch_size when b divides it), as diffusers."""
    return conditioning.repeat_to_batch(latents, batch_size, name)


def strength_start(scheduler: Any, num_inference_steps: int, strength: float) -> int:
    """The first model call of an img2img/inpaint run at ``strength`` (diffusers' ``get_timesteps``)."""
    start, remaining = conditioning.img2img_start(num_inference_steps, strength, scheduler.order)
    if remaining < 1:
        raise ValueError(
            f"strength: {strength} with num_inference_steps={num_inference_steps} leaves no denoising step; "
            "raise strength or num_inference_steps"
        )
    return start


def start_state(scheduler: Any, num_inference_steps: int, strength: float, like: Any) -> tuple[Any, int]:
    """``(state, first model call)`` of an img2img/inpaint run at ``strength`` (diffusers' ``get_timesteps`` +
    ``set_begin_index``): the schedule of ``num_inference_steps`` entered at call ``first``, with multistep
    warm-up restarting there (``set_timesteps(begin_index=)``)."""
    start = strength_start(scheduler, num_inference_steps, strength)
    return scheduler.set_timesteps(num_inference_steps, like=like, begin_index=start), start


def noised_start(scheduler: Any, state: Any, image_latents: Any, noise: Any, start: int) -> Any:
    """Image latents forward-diffused to the start timestep ``state.timesteps[start]`` with ``noise``."""
    xp = arrays.namespace(image_latents)
    t = xp.repeat(state.timesteps[start : start + 1], image_latents.shape[0], axis=0)  # (B,)
    return scheduler.add_noise(image_latents, noise, t, state=state)


def inpaint_extra(mask_latents: Any, masked_image_latents: Any, parts: int) -> Any:
    """The 9-channel inpainting UNet's extra input ``cat([mask(1), masked image latents(4)], axis=1)``,
    repeated for each guidance part: (parts * B, 5, h, w)."""
    xp = arrays.namespace(masked_image_latents)
    extra = xp.concat([xp.astype(mask_latents, masked_image_latents.dtype), masked_image_latents], axis=1)
    return extra if parts == 1 else xp.concat([extra] * parts, axis=0)


def pix2pix_extra(image_latents: Any, parts: int) -> Any:
    """InstructPix2Pix's extra input channels: the image latents, or ``cat([img, img, zeros])`` for 3-way guidance."""
    if parts == 1:
        return image_latents
    xp = arrays.namespace(image_latents)
    return xp.concat([image_latents, image_latents, xp.zeros_like(image_latents)], axis=0)


def check_unet_channels(unet_config: Any, latent_channels: int, extra_channels: int, pipeline: str) -> None:
    """The UNet must take ``latent_channels + extra_channels`` input channels (e.g. 4 + 5 for inpainting)."""
    want = latent_channels + extra_channels
    if int(unet_config["in_channels"]) != want:
        raise ValueError(
            f"unet: {pipeline} needs a UNet with in_channels={want} ({latent_channels} latent + {extra_channels} "
            f"conditioning channels), got in_channels={unet_config['in_channels']}"
        )


def upscaler_vae_config(vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """The VAE config the x4 upscaler scales and unscales latents with (its fixed scaling factor)."""
    return {**vae_config, "scaling_factor": UPSCALER_SCALING_FACTOR}


def upscaler_max_noise_level(settings: Mapping[str, Any]) -> int:
    """The x4 upscaler's highest accepted ``noise_level``: ``max_noise_level`` from the pipeline's settings."""
    return int(settings.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))


def check_latent_upscaler_call(
    prompt: Any,
    negative_prompt: Any,
    embeds: tuple[Any, Any, Any, Any],
    image: Any,
    guidance_scale: float,
    num_inference_steps: int,
    output_type: str,
    text_config: Mapping[str, Any],
) -> tuple[int, Any, sd.Guidance]:
    """The x2 latent upscaler's argument checks: ``(batch, prompt, guidance)``.

    ``embeds`` is ``(prompt_embeds, pooled, negative_prompt_embeds, negative_pooled)``; pooled embeddings come
    exactly with their embeddings. CFG stays on (the UNet's time_cond is the pooled text); with
    ``guidance_scale == 0`` the prompts become empty strings, as diffusers.
    """
    batch = sd.check_prompt_inputs(prompt, negative_prompt, embeds[0], embeds[2])
    if (embeds[0] is None) != (embeds[1] is None):
        raise ValueError("pooled_prompt_embeds: pass it exactly when prompt_embeds is given")
    if (embeds[2] is None) != (embeds[3] is None):
        raise ValueError("negative_pooled_prompt_embeds: pass it exactly when negative_prompt_embeds is given")
    sd.check_call_options(
        num_inference_steps=num_inference_steps, num_images_per_prompt=1, eta=0.0, output_type=output_type,
        clip_skip=None, text_config=text_config,
    )  # fmt: skip
    if image is None:
        raise ValueError("image: the low-resolution latents (B, 4, h, w) or images are required")
    if guidance_scale == 0 and prompt is not None:
        prompt = [""] * batch
    return batch, prompt, sd.guidance(guidance_scale, 0.0, {})


def keep_known_region(
    scheduler: Any, state: Any, x: Any, image_latents: Any, noise: Any, mask: Any, stop: int | None = None
) -> Any:
    """4-channel inpainting after a step (``state`` already advanced to call ``k``): outside the mask, the
    image latents re-noised to ``timesteps[k]`` (clean after the last call, or the call before ``stop`` where the
    loop ends early: SDXL's ``denoising_end``); inside, the new sample.

    Branch-free (``xp.where`` on the step counter), so it runs inside a compiled loop.
    """
    xp = arrays.namespace(x)
    n = state.timesteps.shape[0]
    end = n if stop is None else stop
    idx = xp.minimum(state.step_index, xp.asarray(n - 1, dtype=state.step_index.dtype))
    t = xp.repeat(xp.reshape(state.timesteps[idx], (1,)), x.shape[0], axis=0)  # (B,)
    noised = scheduler.add_noise(image_latents, noise, t, state=state)
    known = xp.where(state.step_index < end, noised, image_latents)
    return conditioning.inpaint_blend(x, known, mask)
