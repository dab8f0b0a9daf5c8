"""The torch hooks every Stable Diffusion pipeline shares: text encoding, start latents, guided loop, VAE.

The recipe (checks, prompts, guidance batches, latent shapes, output) is
``diffusion_core.pipelines.stable_diffusion``; this module binds it to torch modules, generators and the
Python denoising loop of ``diffusion_core.torch.sampling``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.image import images_to_output
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.sampling import Generators, denoise_loop, randn_tensor

# Callback: ``callback_on_step_end(pipe, i, t, {"latents": x})`` after each model call; as in diffusers, a
# returned dict's ``"latents"`` replaces the sample.
StepCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], Any]


class StableDiffusionBase(DiffusionPipeline):
    """Torch hooks of the SD recipe: text encoding, start latents, the guided loop, VAE encode/decode."""

    _components = sd.SD_COMPONENTS
    _optional_components = sd.SD_OPTIONAL
    # Outdated scheduler options this pipeline rewrites at construction, as diffusers' (see sd.legacy_scheduler_config).
    _legacy_scheduler_options: tuple[str, ...] = ()

    def __init__(self, **components: Any) -> None:
        super().__init__(**components)
        self.scheduler = sd.updated_scheduler(self.scheduler, self._legacy_scheduler_options, type(self).__name__)

    @property
    def vae_scale_factor(self) -> int:
        return sd.vae_scale_factor(self.vae.config)

    def _as_tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """numpy or torch -> a tensor on the pipeline's device (``dtype`` defaults to the UNet's)."""
        tensor = value if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
        return tensor.to(device=self.device, dtype=dtype or self.unet.dtype)

    def _encode_ids(self, ids: np.ndarray, clip_skip: int | None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): the last hidden state, or layer ``-(clip_skip + 1)`` after the final norm."""
        input_ids = torch.from_numpy(ids).to(self.device)
        with torch.inference_mode():
            out = self.text_encoder(input_ids, output_hidden_states=clip_skip is not None)
            if clip_skip is None:
                return out.last_hidden_state
            return self._final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def _final_layer_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        encoder = getattr(self.text_encoder, "text_model", self.text_encoder)
        return encoder.final_layer_norm(hidden)

    def _text_embeddings(self, args: dict[str, Any], g: sd.Guidance) -> torch.Tensor:
        """``encoder_hidden_states`` for the guided batch, (parts * B * n, L, D), in the text encoder's dtype."""
        given = [None if e is None else self._as_tensor(e, self.text_encoder.dtype) for e in args["embeds"]]
        pos, neg = sd.encode_prompts(
            self._encode_ids,
            self.tokenizer,
            args["prompt"],
            args["negative_prompt"],
            given[0],
            given[1],
            g.parts > 1,
            args["clip_skip"],
        )
        return sd.batch_embeddings(pos, neg, args["num_images_per_prompt"], g)

    def _start_latents(self, shape: tuple[int, ...], latents: Any, generator: Generators) -> torch.Tensor:
        """The starting Gaussian draw: ``latents=`` (numpy) or noise from ``generator``."""
        start = sd.check_latents(latents, shape)
        if start is None:
            return randn_tensor(shape, generator, dtype=self.unet.dtype, device=self.device)
        return self._as_tensor(start)

    def _denoise(
        self,
        x: torch.Tensor,
        state: Any,
        embeds: torch.Tensor,
        g: sd.Guidance,
        generator: Generators,
        eta: float,
        callback: StepCallback | None = None,
        extra: torch.Tensor | None = None,
        unet_kwargs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
        scheduler: Any = None,
    ) -> torch.Tensor:
        """The guided loop from ``state.step_index`` on; ``extra`` channels are appended to the UNet input and
        ``unet_kwargs(x_scaled, t)`` (ControlNet residuals, class labels) adds UNet keywords per model call."""

        def model_fn(x_scaled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = unet_kwargs(x_scaled, t) if unet_kwargs is not None else {}
            out = self.unet(sd.model_input(x_scaled, g, extra), t, embeds, **kwargs)
            return sd.combine(out, g)

        return self._run_loop(x, state, model_fn, generator, eta, callback, scheduler)

    def _run_loop(
        self,
        x: torch.Tensor,
        state: Any,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        generator: Generators,
        eta: float,
        callback: StepCallback | None,
        scheduler: Any = None,
    ) -> torch.Tensor:
        """``diffusion_core.torch.sampling.denoise_loop`` with the pipeline's scheduler (or ``scheduler``), progress bar
        and callback."""
        scheduler = self.scheduler if scheduler is None else scheduler
        step_callback = None
        if callback is not None:

            def step_callback(i: int, sample: torch.Tensor, st: Any) -> torch.Tensor | None:
                returned = callback(self, i, st.timesteps[i], {"latents": sample})
                return returned.get("latents") if isinstance(returned, dict) else None

        x, _ = denoise_loop(
            scheduler,
            model_fn,
            x,
            state,
            generator=generator,
            step_kwargs=sd.step_kwargs(self.scheduler, eta),
            progress=not self.progress_bar_disabled,
            callback=step_callback,
        )
        return x

    def _encode_image(self, image: np.ndarray, batch: int, generator: Generators, sample: bool = True) -> torch.Tensor:
        """(b, 3, H, W) images in [-1, 1] -> (batch, C, h, w) VAE latents (unscaled), tiled to ``batch``.

        ``sample``: a posterior draw with noise from ``generator`` (a list draws image i from generator i,
        after tiling, as diffusers); otherwise the posterior mode.
        """
        x = self._as_tensor(image, self.vae.dtype)
        if isinstance(generator, (list, tuple)):
            x = sd_image.image_batch(x, batch)
        with torch.inference_mode():
            posterior = self.vae.encode(x)
            if not sample:
                return sd_image.image_batch(posterior.mode(), batch)
            noise = randn_tensor(posterior.mean.shape, generator, dtype=self.vae.dtype, device=self.device)
            return sd_image.image_batch(posterior.sample(noise), batch)

    def _vae_config(self) -> dict[str, Any]:
        """The VAE config the latents are scaled with (the x4 upscaler overrides ``scaling_factor``)."""
        return self.vae.config

    def _decode(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """``output_type`` "latent" returns the latents; otherwise the VAE decodes them to "np"/"pil" images."""
        if output_type == "latent":
            images = latents
        else:
            z = sd.unscale_latents(latents.to(self.vae.dtype), self._vae_config())
            with torch.inference_mode():
                decoded = self.vae.decode(z)  # (B, 3, H, W) in [-1, 1]
            images = images_to_output(decoded.float().cpu().numpy(), output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _common_checks(self, args: dict[str, Any]) -> int:
        """Validate the arguments every SD pipeline shares; returns the prompt batch size."""
        embeds = args["embeds"]
        batch = sd.check_prompt_inputs(args["prompt"], args["negative_prompt"], embeds[0], embeds[1])
        sd.check_call_options(
            num_inference_steps=args["num_inference_steps"],
            num_images_per_prompt=args["num_images_per_prompt"],
            eta=args["eta"],
            output_type=args["output_type"],
            clip_skip=args["clip_skip"],
            text_config=self.text_encoder.config,
        )
        return batch


def prompt_args(
    prompt: Any,
    negative_prompt: Any,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    num_images_per_prompt: int,
    num_inference_steps: int,
    eta: float,
    output_type: str,
    clip_skip: int | None,
) -> dict[str, Any]:
    """The arguments every SD ``__call__`` shares, bundled for ``StableDiffusionBase`` helpers."""
    return dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        embeds=(prompt_embeds, negative_prompt_embeds),
        num_images_per_prompt=num_images_per_prompt,
        num_inference_steps=num_inference_steps,
        eta=eta,
        output_type=output_type,
        clip_skip=clip_skip,
    )
