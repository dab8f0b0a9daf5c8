"""The recipes of the image-conditioned SD pipelines, written once (see ``sd_recipe`` for the hook contract).

Img2img, inpaint, InstructPix2Pix, ControlNet, the x4 upscaler and the x2 latent upscaler: each overrides the
hooks it needs. Per-image ``inputs`` each backend builds (with its VAE and RNG) before the loop:

- img2img: ``noise``, ``image_latents`` (scaled posterior draws);
- inpaint: ``noise``, ``mask`` (latent size), ``image_latents`` (strength < 1 or a 4-channel UNet),
  ``masked_latents`` (9-channel UNet only);
- InstructPix2Pix: ``noise``, ``image_latents`` (unscaled posterior mode);
- ControlNet: ``noise``, ``control`` (N, nets, 3, H, W); with img2img / inpaint, their inputs too;
- x4 upscaler: ``noise``, ``low_res`` (the noised low-res image, tiled to N);
- x2 latent upscaler: ``noise``, ``low_res`` (scaled latents), ``time_cond`` (guidance-batch order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import numpy as np

from diffusion_core import arrays
from diffusion_core.pipelines import conditioning, sd_control, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.components import lookup_component_class
from diffusion_core.pipelines.sd_recipe import SDRequest, StableDiffusionRecipe, repeat_parts

__all__ = [
    "ControlNetImg2ImgRecipe",
    "ControlNetInpaintRecipe",
    "ControlNetRecipe",
    "Img2ImgRecipe",
    "InpaintRecipe",
    "LatentUpscaleRecipe",
    "Pix2PixRecipe",
    "TextToImageRecipe",
    "UpscaleRecipe",
]

UPSCALER_COMPONENTS = (
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "low_res_scheduler",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "watermarker",
)


def pure_noise(strength: float) -> bool:
    """Whether an inpaint run at ``strength`` starts from pure noise (diffusers: ``strength == 1``)."""
    return strength >= 1.0


def inpaint_needs_image_latents(strength: float, blend: bool) -> bool:
    """The encoded image is needed to start mid-schedule or to blend the known region (4-channel UNets)."""
    return blend or not pure_noise(strength)


class TextToImageRecipe(StableDiffusionRecipe):
    """Text-to-image latent diffusion (Rombach et al. 2022): the base recipe, plus diffusers' scheduler fixes."""

    _legacy_scheduler_options = ("steps_offset", "clip_sample")


class Img2ImgRecipe(StableDiffusionRecipe):
    """Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to ``strength``, then denoise."""

    _legacy_scheduler_options = ("steps_offset", "clip_sample")

    def _start(self, inputs: Mapping[str, Any], state: Any, opts: Mapping[str, Any]) -> Any:
        return sd_image.noised_start(self.scheduler, state, inputs["image_latents"], inputs["noise"], opts["first"])


class InpaintRecipe(StableDiffusionRecipe):
    """Inpainting (Rombach et al. 2022): a 9-channel UNet sees ``cat([x_t, mask, masked image latents])``; a
    4-channel (text-to-image) UNet keeps the re-noised original outside the mask after every step."""

    _legacy_scheduler_options = ("steps_offset", "skip_prk_steps")

    def _start(self, inputs: Mapping[str, Any], state: Any, opts: Mapping[str, Any]) -> Any:
        if pure_noise(opts["strength"]):  # also when the image latents are kept for blending
            return super()._start(inputs, state, opts)
        return sd_image.noised_start(self.scheduler, state, inputs["image_latents"], inputs["noise"], opts["first"])

    def _extra(self, inputs: Mapping[str, Any], g: sd.Guidance) -> Any:
        if "masked_latents" not in inputs:  # a 4-channel UNet blends instead
            return None
        return sd_image.inpaint_extra(inputs["mask"], inputs["masked_latents"], g.parts)

    def _post_step(self, inputs: Mapping[str, Any], opts: Mapping[str, Any]) -> Callable[[Any, Any], Any] | None:
        """4-channel UNets: after each step, the re-noised original outside the mask (diffusers' blend)."""
        if "masked_latents" in inputs:
            return None
        scheduler, image_latents, noise, mask = self.scheduler, inputs["image_latents"], inputs["noise"], inputs["mask"]
        stop = opts.get("stop")
        return lambda x, state: sd_image.keep_known_region(scheduler, state, x, image_latents, noise, mask, stop)


class Pix2PixRecipe(StableDiffusionRecipe):
    """Instruction-following image editing (Brooks et al. 2023): image latents as extra UNet channels."""

    def _extra(self, inputs: Mapping[str, Any], g: sd.Guidance) -> Any:
        return sd_image.pix2pix_extra(inputs["image_latents"], g.parts)


class ControlNetRecipe(StableDiffusionRecipe):
    """SD with one ControlNet or several (Zhang et al. 2023): their residuals, each weighted per model call, summed
    into the UNet. ``controlnet=[cn1, cn2, ...]`` becomes the backend's ``MultiControlNetModel`` (as diffusers)."""

    _components = (*sd.SD_COMPONENTS[:4], "controlnet", *sd.SD_COMPONENTS[4:])
    _loop_networks = ("unet", "controlnet")

    def __init__(self, **components: Any) -> None:
        if isinstance(components.get("controlnet"), (list, tuple)):
            components["controlnet"] = self._multi_controlnet_class()(components["controlnet"])
        super().__init__(**components)

    @classmethod
    def _multi_controlnet_class(cls) -> type:
        return lookup_component_class(cls._component_table, "MultiControlNetModel", component="controlnet").resolve()

    def _controlnets(self) -> tuple[list[Any], bool]:
        """``(the ControlNets, whether they run as one MultiControlNetModel)``."""
        if isinstance(self.controlnet, self._multi_controlnet_class()):
            return list(self.controlnet.nets), True
        return [self.controlnet], False

    def _control_inputs(
        self, request: SDRequest, image: Any, size: tuple[int | None, int | None], guess_mode: bool,
        conditioning_scale: Any, window: tuple[Any, Any], name: str = "image",
    ) -> tuple[np.ndarray, tuple[int, int], tuple, tuple]:  # fmt: skip
        """Checks and host inputs: ``(control images per generated image and net (N, nets, 3, H, W), (height,
        width), opts, scalars)``; guess mode is on when asked or when the (first) ControlNet pools its conditions.
        ``name``: the call's argument holding the control images."""
        nets, multi = self._controlnets()
        images = sd_control.control_images(image, len(nets), multi, name)
        settings = sd_control.control_settings(len(nets), conditioning_scale, window[0], window[1])
        guess = bool(guess_mode or nets[0].config.get("global_pool_conditions", False))
        controls = [sd_image.preprocess_control_image(im, self.vae_scale_factor, size[0], size[1]) for im in images]
        sizes = {c.shape[2:] for c in controls}  # each (b, 3, H, W)
        if len(sizes) > 1:
            raise ValueError(f"{name}: the control images must share one size (height x width), got {sorted(sizes)}")
        size = sd.resolve_size(controls[0].shape[2], controls[0].shape[3], self.unet.config, self.vae.config)
        batch, per_prompt = request.batch, request.num_images_per_prompt
        per_image = np.stack([sd_control.control_image_batch(c, batch, per_prompt, 1, guess) for c in controls], 1)
        # static options (the flax program's cache key): the guidance windows; the scales are traced scalars
        opts = (
            ("guess_mode", guess),
            ("multi_controlnet", multi),
            ("control_guidance", (settings.starts, settings.ends)),
        )
        return per_image, size, opts, (*request.scalars, ("controlnet_conditioning_scale", settings.scales))

    def _model_fn(
        self, nets: Mapping[str, Any], inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any],
        state: Any, opts: Mapping[str, Any],
    ) -> Callable[[Any, Any, Any], Any]:  # fmt: skip
        """``(x, t, i)``: each ControlNet's residuals, weighted by its scale and guidance window at call i, summed
        into the guided UNet."""
        unet, controlnet, context, extra = nets["unet"], nets["controlnet"], inputs["context"], self._extra(inputs, g)
        guess_mode, multi, (starts, ends) = opts["guess_mode"], opts["multi_controlnet"], opts["control_guidance"]
        b, count = inputs["noise"].shape[0], len(starts)
        controls = [  # per net: (N or parts * N, 3, H, W)
            sd_control.control_image_batch(inputs["control"][:, k], b, 1, g.parts, guess_mode) for k in range(count)
        ]
        cond_context = context[-b:] if guess_mode else context  # guess mode: the conditional half only
        kwargs = self._unet_kwargs(inputs, g, scalars)  # SDXL: the added conditioning, for both networks
        cond_kwargs = conditional_rows(kwargs, b) if guess_mode else kwargs
        keeps = sd_control.controlnet_keeps(opts["num_calls"], starts, ends, opts["first"])  # (calls, nets)
        keep = arrays.host_to_like(keeps, context)
        scales = scalars["controlnet_conditioning_scale"]  # (nets,): traced by the flax program

        def model_fn(x: Any, t: Any, i: Any) -> Any:
            weights = [scales[k] * keep[i, k] for k in range(count)]
            x_in = x if guess_mode else sd.model_input(x, g)
            cond, weight = (controls, weights) if multi else (controls[0], weights[0])
            down, mid = controlnet(
                x_in, t, cond_context, controlnet_cond=cond, conditioning_scale=weight, guess_mode=guess_mode,
                **cond_kwargs,
            )  # fmt: skip
            if guess_mode:
                down, mid = sd_control.guess_mode_residuals(down, mid, g.parts)
            residuals = {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}
            return sd.combine(unet(sd.model_input(x, g, extra), t, context, **residuals, **kwargs), g)

        return model_fn


def conditional_rows(kwargs: Mapping[str, Any], b: int) -> dict[str, Any]:
    """Model keywords (arrays, or mappings of arrays) cut to their last ``b`` rows: the conditional half of a
    guidance batch, which a guess-mode ControlNet sees (diffusers' ``chunk(2)[1]``)."""
    return {k: conditional_rows(v, b) if isinstance(v, Mapping) else v[-b:] for k, v in kwargs.items()}


class ControlNetImg2ImgRecipe(ControlNetRecipe, Img2ImgRecipe):
    """Image-to-image steered by ControlNets: img2img's noised start, the ControlNet model function."""

    _legacy_scheduler_options = ()  # diffusers' ControlNet pipelines leave the scheduler config as given


class ControlNetInpaintRecipe(ControlNetRecipe, InpaintRecipe):
    """Inpainting steered by ControlNets: inpaint's start, extra channels and blend; the ControlNets see the
    4-channel latents, the UNet its inpainting input."""

    _legacy_scheduler_options = ()


class UpscaleRecipe(StableDiffusionRecipe):
    """Text-guided x4 super-resolution: the noised low-res image as extra channels, its noise level as class."""

    _components = UPSCALER_COMPONENTS
    _optional_components = ("safety_checker", "feature_extractor", "watermarker")

    @property
    def max_noise_level(self) -> int:
        return sd_image.upscaler_max_noise_level(self.settings)

    def _vae_config(self) -> Mapping[str, Any]:
        return sd_image.upscaler_vae_config(self.vae.config)

    def _low_res_pixels(self, request: SDRequest, image: Any, noise_level: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Checks and the low-res images: ``((B, 3, h, w) in [-1, 1], (height, width) generated)``."""
        conditioning.check_noise_level(noise_level, self.max_noise_level)
        if image is None:
            raise ValueError("image: the low-resolution image is required (PIL image(s) or numpy in [0, 1])")
        pixels = sd_image.preprocess_image(image, self.vae_scale_factor, resample="bicubic")  # (B, 3, h, w)
        if pixels.shape[0] != request.prompts:
            raise ValueError(
                f"image: {pixels.shape[0]} images for {request.prompts} prompts; pass one image per prompt"
            )
        channels = self._latent_channels()
        sd_image.check_unet_channels(self.unet.config, channels, int(pixels.shape[1]), type(self).__name__)
        scale = self.vae_scale_factor
        return pixels, (int(pixels.shape[2]) * scale, int(pixels.shape[3]) * scale)

    def _noised_low_res(self, low_res: Any, noise: Any, noise_level: int, batch: int) -> Any:
        """The low-res images noised to ``noise_level`` by the low-res scheduler, tiled to the ``batch`` generated
        images (prompt-major tiling ``[p0, p1, p0, p1, ...]``, as diffusers)."""
        noised, _ = conditioning.upscaler_condition(
            self.low_res_scheduler, low_res, noise, noise_level, self.max_noise_level
        )
        return arrays.namespace(noised).concat([noised] * (batch // low_res.shape[0]), axis=0)  # (N, 3, h, w)

    def _extra(self, inputs: Mapping[str, Any], g: sd.Guidance) -> Any:
        return repeat_parts(inputs["low_res"], g.parts)

    def _unet_kwargs(self, inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any]) -> dict[str, Any]:
        low_res = inputs["low_res"]  # (N, 3, h, w)
        xp = arrays.namespace(low_res)
        labels = xp.astype(xp.zeros_like(low_res[:, 0, 0, 0]) + scalars["noise_level"], xp.int32)  # (N,)
        return {"class_labels": repeat_parts(labels, g.parts)}  # (parts * N,) the noise level


class LatentUpscaleRecipe(StableDiffusionRecipe):
    """2x upscaling in latent space: a K-diffusion UNet with Karras preconditioning on (sigma, pooled text)."""

    _components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    _optional_components = ()

    def _latent_upscale_request(self, arguments: Mapping[str, Any]) -> tuple[SDRequest, tuple[Any, Any, Any, Any]]:
        """The x2 upscaler's checks on its ``__call__``'s ``locals()``: ``(request, (prompt, pooled, negative,
        negative pooled) embeddings)``."""
        a = arguments
        embeds = (
            a["prompt_embeds"], a["pooled_prompt_embeds"], a["negative_prompt_embeds"],
            a["negative_pooled_prompt_embeds"],
        )  # fmt: skip
        steps, output_type = a["num_inference_steps"], a["output_type"]
        batch, prompt, g = sd_image.check_latent_upscaler_call(
            a["prompt"], a["negative_prompt"], embeds, a["image"], a["guidance_scale"], steps, output_type,
            self.text_encoder.config,
        )  # fmt: skip
        request = SDRequest(
            prompt, a["negative_prompt"], embeds[0], embeds[2], 1, int(steps), 0.0, output_type, None, g, batch
        )
        return request, embeds

    def _low_res_input(self, image: Any, batch: int) -> tuple[Any, np.ndarray | None, tuple[int, int, int]]:
        """``(latents as given or None, images to VAE-encode or None, (C, h, w) low-res latent shape)``."""
        channels = self._latent_channels()
        if array_api_compat.is_array_api_obj(image) and image.ndim == 4 and image.shape[1] == channels:
            given, pixels, size = image, None, (int(image.shape[2]), int(image.shape[3]))
        else:
            pixels = sd_image.preprocess_image(image, self.vae_scale_factor)
            given, size = None, (pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor)
        count = (given if given is not None else pixels).shape[0]
        if count != batch:
            raise ValueError(f"image: {count} images for {batch} prompts; pass one per prompt")
        sd_image.check_unet_channels(self.unet.config, channels, channels, type(self).__name__)
        return given, pixels, (channels, *size)

    def _pooled_context(self, request: SDRequest, embeds: tuple[Any, Any, Any, Any]) -> tuple[Any, Any]:
        """``(hidden (parts * B, L, D), time_cond (parts * B, 64 + 64 + D))`` from the text encoder's unnormed
        last layer and pooled output (backend hook ``_encode_pair``)."""
        given = tuple(None if e is None else self._embeds_array(e) for e in embeds)
        hidden, pooled = sd.encode_prompt_pairs(
            self._encode_pair, self.tokenizer, request.prompt, request.negative_prompt, given,
            request.guidance.parts > 1,
        )  # fmt: skip
        return hidden, conditioning.latent_upscaler_timestep_cond(pooled)

    def _model_fn(
        self, nets: Mapping[str, Any], inputs: Mapping[str, Any], g: sd.Guidance, scalars: Mapping[str, Any],
        state: Any, opts: Mapping[str, Any],
    ) -> Callable[[Any, Any, Any], Any]:  # fmt: skip
        """The preconditioned, guided denoiser ``D(x; sigma_i)`` at model call ``i``."""
        unet, hidden, time_cond = nets["unet"], inputs["context"], inputs["time_cond"]
        image_cond = conditioning.latent_upscaler_image_cond(repeat_parts(inputs["low_res"], g.parts))
        sigmas = state.sigmas

        def model_fn(x: Any, t: Any, i: Any) -> Any:
            sigma = sigmas[i]
            x_in = sd.model_input(x, g, image_cond)  # (parts * N, 2C, H, W)
            out = unet(x_in, conditioning.latent_upscaler_timestep(sigma), hidden, timestep_cond=time_cond)
            sample = sd.model_input(x, g) * (sigma**2 + 1) ** 0.5  # the unscaled x, repeated per part
            return sd.combine(conditioning.latent_upscaler_precondition(sample, out, sigma), g)

        return model_fn
