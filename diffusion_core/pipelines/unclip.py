"""The unCLIP (Karlo) pipeline, defined once: its validated request and recipe (Ramesh et al. 2022, arXiv 2204.06125).

Three stages, each a scheduler loop the backends run with their own loop driver and RNG:
prior (text -> CLIP image embedding, a (B, D) sample), decoder (embedding -> 64x64 image, learned
variance), super-resolution (bicubic-upsampled image -> 256x256; ``super_res_first`` on every call
but the last, ``super_res_last`` there). Guidance is on when either guidance scale is > 1, and
then applies to both the prior and the decoder, as in diffusers. Random draws happen in diffusers'
order: prior start, prior steps, decoder start, decoder steps, super-resolution start and steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.image import check_output_type, images_to_output

STAGES = ("prior", "decoder", "super_res")  # the loops, in the order they run (and draw noise)


@dataclass(frozen=True, eq=False)
class UnCLIPRequest:
    """An ``UnCLIPPipeline`` call's arguments, checked once (:func:`unclip_request`)."""

    texts: tuple[str, ...]  # one per prompt
    num_images_per_prompt: int
    steps: Mapping[str, int]  # stage -> num_inference_steps
    shapes: Mapping[str, tuple[int, ...]]  # stage -> start-sample shape: (B, D), (B, C, h, w), (B, C, H, W)
    latents: Mapping[str, np.ndarray | None]  # stage -> the given start draw, or None (the backend draws it)
    prior_guidance_scale: float
    decoder_guidance_scale: float
    output_type: str

    @property
    def batch(self) -> int:
        return len(self.texts) * self.num_images_per_prompt

    @property
    def guided(self) -> bool:
        """diffusers guides both the prior and the decoder when either scale is > 1."""
        return self.prior_guidance_scale > 1.0 or self.decoder_guidance_scale > 1.0


def _size(config: Mapping[str, Any]) -> tuple[int, int]:
    size = config["sample_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def stage_shapes(configs: Mapping[str, Mapping[str, Any]], batch: int) -> dict[str, tuple[int, ...]]:
    """Start shapes from the prior's ``embedding_dim``, the decoder's and ``super_res_first``'s size and channels.

    The super-resolution UNets take [noisy image, upsampled image]: half their ``in_channels`` is the sample.
    """
    super_res = configs["super_res_first"]
    return {
        "prior": (batch, int(configs["prior"]["embedding_dim"])),
        "decoder": (batch, int(configs["decoder"]["in_channels"]), *_size(configs["decoder"])),
        "super_res": (batch, int(super_res["in_channels"]) // 2, *_size(super_res)),
    }


def _steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        raise ValueError(
            f"{name}: must be an int >= 2 (unCLIP's schedule spaces steps by (T - 1) / (n - 1)), got {value!r}"
        )
    return int(value)


def _scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _latents(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """A given start draw as float32 numpy of exactly ``shape`` (numpy, torch or jax input)."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name}: must be a floating array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr.astype(np.float32)


def unclip_request(
    configs: Mapping[str, Mapping[str, Any]],
    prompt: str | Sequence[str],
    *,
    num_images_per_prompt: int = 1,
    prior_num_inference_steps: int = 25,
    decoder_num_inference_steps: int = 25,
    super_res_num_inference_steps: int = 7,
    prior_latents: Any = None,
    decoder_latents: Any = None,
    super_res_latents: Any = None,
    prior_guidance_scale: float = 4.0,
    decoder_guidance_scale: float = 8.0,
    output_type: str = "pil",
) -> UnCLIPRequest:
    """Check an ``UnCLIPPipeline`` call; ``configs``: the ``prior``, ``decoder`` and ``super_res_first`` configs."""
    if not sd._is_texts(prompt):
        raise ValueError(f"prompt: must be a str or a non-empty list of str, got {prompt!r}")
    texts = tuple(sd.prompt_texts(prompt))
    check_output_type(output_type, ("pil", "np"))
    n = sd._positive_int("num_images_per_prompt", num_images_per_prompt)
    steps = {
        "prior": _steps("prior_num_inference_steps", prior_num_inference_steps),
        "decoder": _steps("decoder_num_inference_steps", decoder_num_inference_steps),
        "super_res": _steps("super_res_num_inference_steps", super_res_num_inference_steps),
    }
    shapes = stage_shapes(configs, len(texts) * n)
    given = {"prior": prior_latents, "decoder": decoder_latents, "super_res": super_res_latents}
    latents = {s: _latents(f"{s}_latents", given[s], shapes[s]) for s in STAGES}
    return UnCLIPRequest(
        texts, n, steps, shapes, latents,
        _scale("prior_guidance_scale", prior_guidance_scale), _scale("decoder_guidance_scale", decoder_guidance_scale),
        output_type,
    )  # fmt: skip


# ----- text conditioning -------------------------------------------------------------------------------
def tokenize_with_mask(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) int64 ids padded to ``model_max_length`` and their (B, L) bool attention mask."""
    enc = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np")  # fmt: skip
    return np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"]).astype(bool)


def batch_text(cond: Any, uncond: Any, num_images_per_prompt: int, guided: bool) -> Any:
    """Each prompt's row repeated per image; with guidance, [unconditional rows, conditional rows]."""
    xp = arrays.namespace(cond)
    cond = xp.repeat(cond, num_images_per_prompt, axis=0)
    if not guided:
        return cond
    return xp.concat([xp.repeat(uncond, num_images_per_prompt, axis=0), cond], axis=0)


def decoder_attention_mask(text_mask: Any, extra_tokens: int) -> Any:
    """The decoder's context mask: the text mask after ``extra_tokens`` always-visible image tokens."""
    xp = arrays.namespace(text_mask)
    visible = xp.ones((text_mask.shape[0], extra_tokens), dtype=text_mask.dtype)
    return xp.concat([visible, text_mask], axis=1)  # (B, extra + L)


# ----- guidance ----------------------------------------------------------------------------------------
def model_batch(x: Any, guided: bool) -> Any:
    """The model input: the sample twice (unconditional, conditional) under guidance."""
    return arrays.namespace(x).concat([x, x], axis=0) if guided else x


def guide_prior(prediction: Any, scale: float, guided: bool) -> Any:
    """uncond + scale (cond - uncond) on the predicted image embeddings."""
    if not guided:
        return prediction
    half = prediction.shape[0] // 2
    uncond, cond = prediction[:half], prediction[half:]
    return uncond + scale * (cond - uncond)


def guide_decoder(noise_pred: Any, channels: int, scale: float, guided: bool) -> Any:
    """Guided eps (first ``channels``) with the conditional half's predicted variance appended."""
    if not guided:
        return noise_pred
    xp = arrays.namespace(noise_pred)
    half = noise_pred.shape[0] // 2
    uncond, cond = noise_pred[:half, :channels], noise_pred[half:, :channels]
    variance = noise_pred[half:, channels:]
    return xp.concat([uncond + scale * (cond - uncond), variance], axis=1)


# ----- super-resolution input and output ---------------------------------------------------------------
def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's, and torch's antialiased bicubic)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64 weights of ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``.

    Each output sample is centred at (i + 0.5) * scale in input coordinates; the kernel is widened by the
    scale when shrinking (antialiasing), rows are normalised and clipped at the borders, as PIL does.
    """
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) / stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def upsample_bicubic(images: Any, height: int, width: int) -> Any:
    """(B, C, h, w) -> (B, C, height, width), separable bicubic (torch's antialiased ``F.interpolate``)."""
    xp = arrays.namespace(images)
    rows = arrays.host_to_like(bicubic_matrix(images.shape[2], height), images)  # (height, h)
    cols = arrays.host_to_like(bicubic_matrix(images.shape[3], width).T, images)  # (w, width)
    return xp.matmul(xp.matmul(rows, images), cols)  # (B, C, height, width)


def super_res_input(sample: Any, upscaled: Any) -> Any:
    """The super-resolution UNets' input: [noisy sample, upsampled decoder image] on the channel axis."""
    return arrays.namespace(sample).concat([sample, upscaled], axis=1)


def clamp_image(x: Any) -> Any:
    """The decoder's image, clamped to [-1, 1] before upsampling."""
    return arrays.namespace(x).clip(x, -1.0, 1.0)


def finish(images_nchw: np.ndarray, output_type: str) -> Any:
    """(B, C, H, W) numpy images in [-1, 1] -> PIL images or a (B, H, W, C) array in [0, 1]."""
    return images_to_output(images_nchw, output_type)
