"""The SDXL recipes, written once (see ``sd_recipe`` for the hook contract): text to image and img2img (the refiner).

They reuse the SD recipe; SDXL adds two text encoders, the pooled text and size/crop ids the UNet's
``added_cond_kwargs`` take, and the ``denoising_start`` / ``denoising_end`` cuts of the base -> refiner ensemble.
Per-image inputs: ``context`` (hidden states), ``text_embeds`` and ``time_ids`` (guidance-batch order), ``noise``;
img2img adds ``image_latents`` (scaled, or the ``latents=`` given: used as they are, as diffusers).

Backend primitive: ``_encode_layers(i, ids, clip_skip) -> (hidden (B, L, D), pooled (B, P) or None)`` runs text
encoder ``i`` of :meth:`SDXLRecipe._text_encoders` and returns layer ``-(2 + clip_skip)`` and its projected pooled
text (None for a plain ``CLIPTextModel``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

from diffusion_core.pipelines import sd_image, sdxl
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import REQUEST_ARGUMENTS, SDRequest, StableDiffusionRecipe, sd_request
from diffusion_core.pipelines.sd_recipes import ControlNetRecipe, InpaintRecipe

__all__ = ["SDXLControlNetRecipe", "SDXLImg2ImgRecipe", "SDXLInpaintRecipe", "SDXLRecipe", "SDXLTextToImageRecipe"]

# Pipeline settings (model_index.json) and diffusers' defaults.
SETTING_DEFAULTS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}


def host(x: Any) -> np.ndarray:
    """A (small) schedule array on the host as numpy."""
    return np.asarray(x.cpu() if array_api_compat.is_torch_array(x) else x)


class SDXLRecipe(StableDiffusionRecipe):
    """What every SDXL pipeline shares: the two-encoder text conditioning and the cut schedule."""

    _components = sdxl.SDXL_COMPONENTS
    _optional_components = sdxl.SDXL_OPTIONAL
    _legacy_scheduler_options: tuple[str, ...] = ()  # diffusers' SDXL pipelines rewrite no scheduler option

    def setting(self, name: str) -> Any:
        """A pipeline setting from ``model_index.json`` (``force_zeros_for_empty_prompt``, ...), else its default."""
        return self.settings.get(name, SETTING_DEFAULTS[name])

    def _text_encoders(self) -> list[Any]:
        """``[text_encoder, text_encoder_2]``, or ``[text_encoder_2]`` without the first (the refiner)."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def _tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def _request(self, arguments: Mapping[str, Any]) -> SDRequest:
        given = {name: arguments[name] for name in REQUEST_ARGUMENTS if name in arguments}
        return sd_request(self.text_encoder_2.config, self.unet.config, **given)

    def _sdxl_inputs(self, request: SDRequest, cond: sdxl.SDXLConditions) -> dict[str, Any]:
        """``context`` (parts * N, L, D), ``text_embeds`` (parts * N, P) and ``time_ids`` (parts * N, n)."""
        embeds = (
            request.prompt_embeds, cond.pooled_prompt_embeds, request.negative_prompt_embeds,
            cond.negative_pooled_prompt_embeds,
        )  # fmt: skip
        given = tuple(None if e is None else self._embeds_array(e) for e in embeds)
        zero = bool(self.setting("force_zeros_for_empty_prompt"))
        pos, pooled, neg, neg_pooled = sdxl.encode_sdxl_prompt(
            self._encode_layers, self._tokenizers(), request, cond, zero, given
        )
        sdxl.check_time_id_width(self.unet.config, len(cond.time_ids), int(pooled.shape[-1]))
        g, n = request.guidance, request.num_images_per_prompt
        text_embeds = sd.batch_embeddings(pooled, neg_pooled, n, g)
        return {
            "context": sd.batch_embeddings(pos, neg, n, g),
            "text_embeds": text_embeds,
            "time_ids": sdxl.time_id_batch(cond.time_ids, cond.negative_time_ids, request.batch, g.parts, text_embeds),
        }

    def _unet_kwargs(self, inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any]) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}

    def _stop(self, state: Any, opts: Mapping[str, Any]) -> int | None:
        """``denoising_end``: the model call the loop stops before (None: run to the end)."""
        end = opts.get("denoising_end")
        if end is None:
            return None
        num_train = int(self.scheduler.config["num_train_timesteps"])
        return sdxl.end_call(host(state.timesteps), opts["first"], num_train, end)


class SDXLTextToImageRecipe(SDXLRecipe):
    """SDXL text to image: the SD start (Gaussian draw times ``init_noise_sigma``), cut at ``denoising_end``."""


class SDXLImg2ImgRecipe(SDXLRecipe):
    """SDXL img2img and the refiner: noise the image latents to ``strength``, or with ``denoising_start`` (the
    second half of the ensemble) continue from them as they are; ``latents=`` are the start, used as given."""

    def _schedule(self, num_inference_steps: int, like: Any, opts: Mapping[str, Any]) -> tuple[Any, int]:
        start = opts.get("denoising_start")
        if start is None:
            return super()._schedule(num_inference_steps, like, opts)
        full = self.scheduler.set_timesteps(num_inference_steps, like=like)
        num_train = int(self.scheduler.config["num_train_timesteps"])
        first = sdxl.start_call(host(full.timesteps), num_train, start, self.scheduler.order)
        return self.scheduler.set_timesteps(num_inference_steps, like=like, begin_index=first), first

    def _start(self, inputs: Mapping[str, Any], state: Any, opts: Mapping[str, Any]) -> Any:
        if opts["as_given"]:
            return inputs["image_latents"]
        return sd_image.noised_start(self.scheduler, state, inputs["image_latents"], inputs["noise"], opts["first"])

    def _img2img_checks(self, cond: sdxl.SDXLConditions, num_inference_steps: int, strength: float) -> None:
        if cond.denoising_start is None:
            sd_image.strength_start(self.scheduler, num_inference_steps, strength)  # checks before the work

    def _latent_image(self, image: Any) -> bool:
        """Whether ``image`` is already latents (B, C_latent, h, w): the base pipeline's ``output_type="latent"``."""
        is_array = array_api_compat.is_array_api_obj(image)
        return is_array and image.ndim == 4 and image.shape[1] == self._latent_channels()


class SDXLInpaintRecipe(SDXLRecipe, InpaintRecipe):
    """SDXL inpainting: the SD inpaint hooks (start at ``strength``, mask + masked-image channels for a 9-channel
    UNet, the known region kept for a 4-channel one) with SDXL's text conditioning; ``latents=`` is the Gaussian
    draw, as for SD inpainting."""


class SDXLControlNetRecipe(SDXLRecipe, ControlNetRecipe):
    """SDXL with ControlNets: the SD ControlNet hooks (residuals weighted per call, guess mode) with SDXL's
    text conditioning, which the ControlNet receives too (its conditional half in guess mode)."""

    _components = (*sdxl.SDXL_COMPONENTS[:6], "controlnet", *sdxl.SDXL_COMPONENTS[6:])
