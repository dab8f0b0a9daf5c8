"""DeepFloyd IF pipelines defined once: stage I (``IFPipeline``), stage II (``IFSuperResolutionPipeline``) and
their img2img / inpainting forms (``IFImg2Img[SuperResolution]Pipeline``, ``IFInpainting[SuperResolution]Pipeline``).

Pixel-space cascaded diffusion (Saharia et al. 2022, Imagen's recipe) with a T5 text context. Stage I
draws 64x64 images; stage II draws at 256x256 conditioned on the bilinearly upscaled stage-I image,
forward-diffused to ``noise_level`` by ``image_noising_scheduler`` (noise augmentation, Ho et al. 2021),
with the noise level as the UNet's class label. img2img starts from an image forward-diffused to ``strength``;
inpainting also keeps it outside the mask after every step. The UNets predict (noise, variance range):
schedulers that read the variance (``variance_type`` "learned"/"learned_range") get both halves, others only
the first, as in diffusers.

A backend's pipeline class mixes :class:`IFRecipe` in and adds ``__call__`` (``generator=`` or ``key=``),
its RNG draws and the primitives ``_encode_ids(ids, mask)`` (the text encoder:
``text_encoder(input_ids, attention_mask=mask)[0]``), ``_embeds_array(e)`` and its ``_run`` (noise, loop).
The safety checker, feature extractor and watermarker are not ported: they load as None (one warning
line each from the loader) and the images are returned unchecked and unmarked.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import conditioning, sd_image
from diffusion_core.pipelines import guidance as guidance_math
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.base import ImagePipelineOutput
from diffusion_core.pipelines.image import images_to_output, pil_to_numpy

logger = logging.getLogger(__name__)

IF_COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler", "safety_checker", "feature_extractor", "watermarker")
IF_SR_COMPONENTS = (*IF_COMPONENTS[:4], "image_noising_scheduler", *IF_COMPONENTS[4:])
IF_OPTIONAL = ("tokenizer", "text_encoder", "safety_checker", "feature_extractor", "watermarker")
IF_MAX_LENGTH = 77  # T5 tokens of a prompt (diffusers' IF encode_prompt)
IF_OUTPUT_TYPES = ("pil", "np")


@dataclass(frozen=True, eq=False)
class IFRequest:
    """An IF call's arguments, checked once (:func:`if_request`)."""

    prompt: Any  # str, list of str, or None with prompt_embeds
    negative_prompt: Any
    prompt_embeds: Any  # (B, L, D) or None
    negative_prompt_embeds: Any
    num_images_per_prompt: int
    num_inference_steps: int
    eta: float
    output_type: str
    guidance: sd.Guidance
    prompts: int  # B: the prompt batch
    shape: tuple[int, int, int, int]  # (N, C, H, W) of the generated images
    latents: np.ndarray | None  # the starting Gaussian draw, or None: the backend draws it
    image: np.ndarray | None = None  # stage II: (N, C, h, w) float32 low-res inputs in [-1, 1], one per output
    start_image: np.ndarray | None = None  # img2img / inpainting: (N, C, H, W) float32 in [-1, 1] the run starts from
    noise_level: int | None = None  # stage II: image_noising_scheduler timestep of the upscaled image
    strength: float | None = None  # img2img: how far into the schedule the noised image enters (1: all of it)
    mask: np.ndarray | None = None  # inpainting: (N, 1, H, W) float32, 1 where the image is redrawn, else 0


@dataclass(frozen=True, eq=False)
class ExplicitNoise:
    """Given noise instead of a backend's RNG draws (after the start latents): how the backends are compared."""

    steps: np.ndarray  # (num_calls, N, C, H, W): the scheduler's draw at each model call
    image: np.ndarray | None = None  # (N, C, H, W): stage II's augmentation noise of the upscaled image


def _check_text_options(clean_caption: bool) -> None:
    if not isinstance(clean_caption, bool):
        raise ValueError(f"clean_caption must be a bool, got {clean_caption!r}")


def if_request_from_call(
    unet_config: Mapping[str, Any], call: Mapping[str, Any], stage2: bool, mask_needed_by: str | None = None
) -> IFRequest:
    """:func:`if_request` from a pipeline ``__call__``'s ``locals()``: the arguments it checks are taken by name
    (one list, the signature of ``if_request``), the backend's own (``generator``/``key``, ``return_dict``,
    ``parallel``, ``mesh``) are left to the backend. ``mask_needed_by``: the inpainting pipeline's name, whose
    call must pass ``mask_image``."""
    if mask_needed_by is not None and call.get("mask_image") is None:
        raise ValueError(f"mask_image: {mask_needed_by} needs a mask (1 where the image is redrawn)")
    names = inspect.signature(if_request).parameters
    return if_request(
        unet_config, **{k: v for k, v in call.items() if k in names and k != "unet_config"}, stage2=stage2
    )


def if_request(
    unet_config: Mapping[str, Any],
    *,
    prompt: Any,
    negative_prompt: Any = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    num_images_per_prompt: int = 1,
    num_inference_steps: int,
    eta: float = 0.0,
    output_type: str = "pil",
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    latents: Any = None,
    clean_caption: bool = True,
    image: Any = None,
    noise_level: int | None = None,
    strength: float | None = None,
    mask_image: Any = None,
    original_image: Any = None,
    stage2: bool = False,
) -> IFRequest:
    """Check an IF call. ``stage2``: ``image`` is the low-res input, augmented to ``noise_level``. ``strength``:
    the run starts from ``image`` (stage I) or ``original_image`` (stage II), whose size the output takes, and
    ``mask_image`` (inpainting) keeps it outside the mask."""
    prompts = sd.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    sd.check_call_options(
        num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt, eta=eta,
        output_type=output_type, clip_skip=None, text_config={}, output_types=IF_OUTPUT_TYPES,
    )  # fmt: skip
    _check_text_options(clean_caption)
    g = sd.guidance(guidance_scale, 0.0, unet_config)
    n = prompts * int(num_images_per_prompt)
    channels = int(unet_config["in_channels"]) // (2 if stage2 else 1)  # stage II: [x | upscaled image]
    low_res = _per_image(image, "image", channels, None, prompts, num_images_per_prompt) if stage2 else None
    start = None
    if strength is not None:
        conditioning.img2img_start(int(num_inference_steps), strength, 1)  # checks strength
        name, given = ("original_image", original_image) if stage2 else ("image", image)
        start = _per_image(given, name, channels, int(unet_config["sample_size"]), prompts, num_images_per_prompt)
        height, width = _size(unet_config, *start.shape[2:])
    else:
        height, width = _size(unet_config, height, width)
    noise_level = _check_noise_level(noise_level) if stage2 else None
    shape = (n, channels, height, width)
    mask = None
    if mask_image is not None:
        mask = check_if_mask(mask_image, prompts, int(num_images_per_prompt), int(unet_config["sample_size"]))
        if mask.shape[2:] != shape[2:]:
            raise ValueError(f"mask_image: its size {mask.shape[2:]} differs from the image's {shape[2:]}")
    return IFRequest(
        prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, int(num_images_per_prompt),
        int(num_inference_steps), float(eta), output_type, g, prompts, shape, sd.check_latents(latents, shape),
        low_res, start, noise_level, None if strength is None else float(strength), mask,
    )  # fmt: skip


def _per_image(image: Any, name: str, channels: int, resize: int | None, prompts: int, per_prompt: int) -> np.ndarray:
    """An image input checked (:func:`check_if_image`) and repeated for each image of its prompt: (N, C, H, W)."""
    try:
        images = check_if_image(image, channels, resize)
    except ValueError as e:
        raise ValueError(f"{name}: {str(e).split(': ', 1)[1]}") from e
    if images.shape[0] != prompts:
        raise ValueError(f"{name}: got {images.shape[0]} images for {prompts} prompts")
    return np.repeat(images, per_prompt, axis=0)


def _size(unet_config: Mapping[str, Any], height: Any, width: Any) -> tuple[int, int]:
    """(H, W): given, else the UNet's ``sample_size``; positive ints divisible by 2**levels of the UNet."""
    size = unet_config["sample_size"]
    default = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height or default[0], width or default[1]
    multiple = 2 ** (len(unet_config["block_out_channels"]) - 1)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or value % multiple:
            raise ValueError(
                f"{name} must be a positive int divisible by {multiple} (the UNet's levels), got {value!r}"
            )
    return int(height), int(width)


def _check_noise_level(noise_level: Any) -> int:
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level < 1000:
        raise ValueError(f"noise_level must be an int in [0, 1000) (a noising-scheduler timestep), got {noise_level!r}")
    return int(noise_level)


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image) or (
        isinstance(value, list) and bool(value) and isinstance(value[0], Image.Image)
    )


def resize_pil_if(images: Any, size: int) -> list:
    """diffusers' IF ``resize``: the short side to ``size``, the long side to the nearest multiple of 8, bicubic."""
    from PIL import Image

    out = []
    for im in [images] if isinstance(images, Image.Image) else images:
        w, h = im.size
        w, h = (int(round(size / 8 * w / h) * 8), size) if w >= h else (size, int(round(size / 8 * h / w) * 8))
        out.append(im.resize((w, h), resample=Image.Resampling.BICUBIC, reducing_gap=None))
    return out


def check_if_image(image: Any, channels: int, resize: int | None = None) -> np.ndarray:
    """An IF image input (stage II's low-res image, img2img's start) as (B, C, h, w) float32, as diffusers reads it.

    PIL images (one or a list; RGB, resized with :func:`resize_pil_if` to ``resize`` if given) are scaled from
    [0, 255] to [-1, 1]; numpy arrays are (H, W, C) or (B, H, W, C) values used as they are; other arrays
    (torch / jax tensors) are (B, C, h, w) or (C, h, w) used as they are.
    """
    if image is None:
        raise ValueError("image: this pipeline needs an image (PIL, numpy (B, H, W, C) or a (B, C, H, W) tensor)")
    if _is_pil(image):
        image = [im.convert("RGB") for im in ([image] if not isinstance(image, list) else image)]
        image = resize_pil_if(image, resize) if resize is not None else image
        arr = pil_to_numpy(image) * 2.0 - 1.0  # (B, H, W, C) in [-1, 1]
        arr = np.transpose(arr, (0, 3, 1, 2))
    elif isinstance(image, (np.ndarray, list)):
        arr = np.asarray(image, dtype=np.float32)
        arr = np.transpose(arr[None] if arr.ndim == 3 else arr, (0, 3, 1, 2))
    else:
        arr = np.asarray(image, dtype=np.float32)
        arr = arr[None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise ValueError(f"image: expected {channels}-channel images, got an array of shape {arr.shape}")
    return arr.astype(np.float32)


def check_if_mask(mask_image: Any, prompts: int, num_images_per_prompt: int, resize: int) -> np.ndarray:
    """Inpainting mask as (N, 1, H, W) float32 of 0 (keep) / 1 (redraw), thresholded at 0.5, as diffusers reads it.

    PIL masks (grey, resized as the image) are scaled from [0, 255]; arrays are (H, W), (B, H, W) or (B, 1, H, W)
    in [0, 1]. One mask serves every image; otherwise one per prompt, repeated per image.
    """
    if _is_pil(mask_image):
        masks = resize_pil_if(
            [m.convert("L") for m in ([mask_image] if not isinstance(mask_image, list) else mask_image)], resize
        )
        arr = np.stack([np.asarray(m, np.float32) / 255.0 for m in masks])[:, None]
    else:
        arr = np.asarray(mask_image, dtype=np.float32)
        arr = arr[None, None] if arr.ndim == 2 else (arr[:, None] if arr.ndim == 3 else arr)
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(f"mask_image: expected (H, W), (B, H, W) or (B, 1, H, W) masks, got shape {arr.shape}")
    if arr.shape[0] not in (1, prompts):
        raise ValueError(f"mask_image: got {arr.shape[0]} masks for {prompts} prompts (pass 1 or one per prompt)")
    arr = np.where(arr < 0.5, 0.0, 1.0).astype(np.float32)
    return np.repeat(arr, prompts * num_images_per_prompt if arr.shape[0] == 1 else num_images_per_prompt, axis=0)


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width) bilinear with aligned corners (torch ``align_corners=True``)."""

    def coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * ((n_in - 1) / (n_out - 1))
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = coords(images.shape[2], height)
    x0, x1, fx = coords(images.shape[3], width)
    rows = images[:, :, y0] * (1 - fy)[:, None] + images[:, :, y1] * fy[:, None]  # (B, C, height, w)
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(np.float32)  # (B, C, height, width)


def if_texts(texts: list[str], clean_caption: bool) -> list[str]:
    """diffusers' IF text preprocessing without bs4/ftfy: lower-cased and stripped. ``clean_caption`` (their caption
    cleaning) is not ported: a warning says so, as diffusers warns and falls back here without those packages."""
    if clean_caption:
        logger.warning("clean_caption=True: caption cleaning is not ported; prompts are lower-cased and stripped")
    return [t.lower().strip() for t in texts]


def tokenize_if(tokenizer: Any, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), each (B, max_length) int64, padded and truncated as diffusers' IF encode_prompt."""
    enc = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="np",
    )  # fmt: skip
    return np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64)


class IFRecipe:
    """Stage I and II of DeepFloyd IF over any backend; ``_stage2`` picks the super-resolution hooks."""

    _components = IF_COMPONENTS
    _optional_components = IF_OPTIONAL
    _stage2 = False

    def encode_prompt(self, request: IFRequest, clean_caption: bool = True) -> Any:
        """The UNet's text context (parts * N, L, D): each prompt repeated per image, ``cat([neg, pos])`` for CFG."""
        r = request
        pos, neg = r.prompt_embeds, r.negative_prompt_embeds
        pos = self._encode_texts(sd.prompt_texts(r.prompt), IF_MAX_LENGTH, clean_caption) if pos is None else pos
        pos = self._embeds_array(pos)
        if r.guidance.parts > 1 and neg is None:
            texts = sd.negative_texts(r.negative_prompt, r.prompts)
            neg = self._encode_texts(texts, int(pos.shape[1]), clean_caption)
        neg = None if neg is None else self._embeds_array(neg)
        return sd.batch_embeddings(pos, neg, r.num_images_per_prompt, r.guidance)

    def _encode_texts(self, texts: list[str], max_length: int, clean_caption: bool) -> Any:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "prompt, negative_prompt: this pipeline has no tokenizer/text_encoder; pass prompt_embeds and "
                "negative_prompt_embeds (T5 embeddings) instead"
            )
        ids, mask = tokenize_if(self.tokenizer, if_texts(texts, clean_caption), max_length)
        return self._encode_ids(ids, mask)

    def _schedule(self, request: IFRequest, like: Any) -> tuple[Any, int]:
        """``(state, first model call)``: all of the schedule, or img2img's entry at ``strength``."""
        if request.strength is None:
            return self.scheduler.set_timesteps(request.num_inference_steps, like=like), 0
        return sd_image.start_state(self.scheduler, request.num_inference_steps, request.strength, like)

    def _start(self, request: IFRequest, draw: Any, state: Any, first: int) -> Any:
        """The sample entering the loop: the draw times ``init_noise_sigma``, or (img2img) the image
        forward-diffused with the draw to the first timestep."""
        if request.strength is None:
            return draw * state.init_noise_sigma
        image = arrays.host_to_like(request.start_image, draw)
        noised = sd_image.noised_start(self.scheduler, state, image, draw, first)
        if request.mask is None:
            return noised
        return self._blend(self._blend_inputs(request, draw))(noised, state)

    def _blend_inputs(self, request: IFRequest, like: Any) -> tuple[Any, Any] | None:
        """Inpainting's (image, mask) as ``like``'s arrays (program inputs), or None."""
        if request.mask is None:
            return None
        return arrays.host_to_like(request.start_image, like), arrays.host_to_like(request.mask, like)

    @staticmethod
    def _blend(blend: tuple[Any, Any] | None) -> Any:
        """Inpainting's post-step: the original image outside the mask, the sample inside (diffusers keeps the
        previous sample outside, which is the original there since the start)."""
        if blend is None:
            return None
        image, mask = blend
        return lambda x, state: (1 - mask) * image + mask * x

    def _model_fn(self, unet: Any, context: Any, request: IFRequest, extra: Any, class_labels: Any, state: Any):
        """``(x_scaled, t, i) -> prediction`` for the scheduler: guided, variance channels kept only where read.

        Stage II's ``extra`` (the noisy upscaled image) is scaled with the sample, as diffusers scales their concat.
        """
        g, learned = request.guidance, guidance_math.uses_learned_variance(self.scheduler.config)
        channels = request.shape[1]
        kwargs = {} if class_labels is None else {"class_labels": class_labels}

        def model_fn(x: Any, t: Any, i: Any) -> Any:
            cond = None if extra is None else self.scheduler.scale_model_input(state._replace(step_index=i), extra)
            out = unet(sd.model_input(x, g, cond), t, context, **kwargs)  # (parts * N, 2C, H, W)
            if g.parts > 1:
                out = guidance_math.learned_variance_guidance(out, g.guidance_scale, channels)
            return out if learned else out[:, :channels, ...]

        return model_fn

    def _noise_level_labels(self, request: IFRequest, like: Any) -> Any:
        """Stage II class labels: the noise level per image, repeated for the guidance batch."""
        labels = np.full((request.shape[0] * request.guidance.parts,), request.noise_level, np.int64)
        return arrays.host_to_like(labels, like, integer=True)

    def _augment(self, request: IFRequest, like: Any, noise: Any) -> Any:
        """Stage II conditioning: the low-res image upscaled to (H, W), forward-diffused to ``noise_level`` with
        ``noise``, repeated for the guidance batch: (parts * N, C, H, W)."""
        up = resize_bilinear(request.image, request.shape[2], request.shape[3])
        up = arrays.host_to_like(up, like)
        levels = arrays.host_to_like(np.full((request.shape[0],), request.noise_level, np.int64), like, integer=True)
        noisy = self.image_noising_scheduler.add_noise(up, noise, levels)
        return sd.model_input(noisy, request.guidance)  # parts copies on the batch axis

    def _finish(self, images_nchw: np.ndarray, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """(N, C, H, W) numpy in [-1, 1] -> PIL or (N, H, W, C) in [0, 1], unchecked (no safety checker ported)."""
        images = images_to_output(images_nchw, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)
