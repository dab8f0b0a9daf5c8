"""Guidance: combining the model's conditional and unconditional predictions (any array namespace).

The batch convention is diffusers': classifier-free guidance runs ``cat([uncond, cond])``;
InstructPix2Pix runs ``cat([text+image, image only, neither])``.
"""

from __future__ import annotations

from typing import Any

from diffusion_core import arrays


def _halves(x: Any, parts: int) -> list[Any]:
    n = x.shape[0]
    if n % parts:
        raise ValueError(f"model_output: batch {n} is not a multiple of {parts} (the guidance batch parts)")
    size = n // parts
    return [x[k * size : (k + 1) * size, ...] for k in range(parts)]


def do_classifier_free_guidance(guidance_scale: float) -> bool:
    """Whether to run the unconditional branch: diffusers does so when ``guidance_scale > 1``."""
    return guidance_scale > 1.0


def classifier_free_guidance(model_output: Any, guidance_scale: float) -> tuple[Any, Any]:
    """``uncond + g * (cond - uncond)`` from a ``cat([uncond, cond])`` batch; returns ``(guided, cond)``."""
    uncond, cond = _halves(model_output, 2)
    return uncond + guidance_scale * (cond - uncond), cond


def rescale_guidance(guided: Any, cond: Any, guidance_rescale: float) -> Any:
    """Rescale the guided prediction toward ``cond``'s per-sample std (Lin et al. 2023, sec. 3.4).

    ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``, std over all but the batch axis
    with Bessel's correction (as ``torch.std``).
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if guidance_rescale == 0.0:
        return guided
    xp = arrays.namespace(guided, cond)
    axes = tuple(range(1, guided.ndim))
    std_cond = xp.std(cond, axis=axes, correction=1, keepdims=True)
    std_guided = xp.std(guided, axis=axes, correction=1, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def pix2pix_guidance(model_output: Any, guidance_scale: float, image_guidance_scale: float) -> Any:
    """InstructPix2Pix three-way guidance on a ``cat([text, image, uncond])`` batch (Brooks et al. 2023, eq. 3).

    ``uncond + g * (text - image) + g_img * (image - uncond)``.
    """
    text, image, uncond = _halves(model_output, 3)
    return uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)


def do_pix2pix_guidance(guidance_scale: float, image_guidance_scale: float) -> bool:
    """diffusers runs the 3-way batch when ``guidance_scale > 1`` and ``image_guidance_scale >= 1``."""
    return guidance_scale > 1.0 and image_guidance_scale >= 1.0


def repeat_batch(x: Any, times: int) -> Any:
    """``cat([x] * times)`` along the batch axis."""
    xp = arrays.namespace(x)
    return xp.concat([x] * times, axis=0)


def learned_variance_guidance(model_output: Any, guidance_scale: float, channels: int) -> Any:
    """CFG for a model that also predicts its variance (DeepFloyd IF, unCLIP): ``cat([uncond, cond])`` of
    (B, 2C, H, W) outputs -> (B/2, 2C, H, W): the first ``channels`` guided, the conditional variance kept."""
    uncond, cond = _halves(model_output, 2)
    xp = arrays.namespace(model_output)
    guided = uncond[:, :channels, ...] + guidance_scale * (cond[:, :channels, ...] - uncond[:, :channels, ...])
    return xp.concat([guided, cond[:, channels:, ...]], axis=1)


def uses_learned_variance(scheduler_config: Any) -> bool:
    """Whether a scheduler reads variance channels (diffusers: ``config.variance_type`` "learned"/"learned_range");
    the pipelines hand the others only the first half of a variance-predicting model's output."""
    return scheduler_config.get("variance_type") in ("learned", "learned_range")
