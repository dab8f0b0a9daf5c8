"""The torch primitives every Stable Diffusion pipeline shares: text encoding, noise, VAE calls, the Python loop.

The pipelines themselves (request checks, schedule, start latents, extra channels, model function, post-step hook,
decode) are the core recipes (``diffusion_core.pipelines.sd_recipe`` / ``sd_recipes``); this module binds them to
torch modules, generators and ``diffusion_core.torch.sampling.denoise_loop``. A pipeline adds its ``__call__``,
which builds the recipe's per-image inputs (drawing noise in diffusers' order, so seeded runs match it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffusion_core.pipelines import ImagePipelineOutput, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import SDRequest, StableDiffusionRecipe, images_of_inputs
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.sampling import Generators, denoise_loop, randn_tensor

# Callback: ``callback_on_step_end(pipe, i, t, {"latents": x})`` after each model call; as in diffusers, a
# returned dict's ``"latents"`` replaces the sample.
StepCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], Any]


class StableDiffusionBase(StableDiffusionRecipe, DiffusionPipeline):
    """Torch primitives of the SD recipes: text encoding, start noise, the guided loop, VAE encode/decode."""

    _splits_over_processes = True

    def _as_tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """numpy or torch -> a tensor on the pipeline's device (``dtype`` defaults to the UNet's)."""
        tensor = value if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
        return tensor.to(device=self.device, dtype=dtype or self.unet.dtype)

    def _embeds_array(self, value: Any) -> torch.Tensor:
        return self._as_tensor(value, self.text_encoder.dtype)

    def _encode_ids(self, ids: np.ndarray, clip_skip: int | None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): the last hidden state, or layer ``-(clip_skip + 1)`` after the final norm."""
        input_ids = torch.from_numpy(ids).to(self.device)
        with torch.inference_mode():
            out = self.text_encoder(input_ids, output_hidden_states=clip_skip is not None)
            if clip_skip is None:
                return out.last_hidden_state
            encoder = getattr(self.text_encoder, "text_model", self.text_encoder)
            return encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def _vae_decode(self, z: torch.Tensor) -> np.ndarray:
        if z.shape[0] == 0:  # a process with no image under enable_distributed
            f, channels = self.vae_scale_factor, int(self.vae.config["out_channels"])
            decoded = np.zeros((0, channels, z.shape[2] * f, z.shape[3] * f), np.float32)
        else:
            with torch.inference_mode():
                decoded = self.vae.decode(z.to(self.vae.dtype)).float().cpu().numpy()  # (n, 3, H, W) in [-1, 1]
        return self._gather_share(decoded)  # (N, 3, H, W): every process's share under enable_distributed

    def _latent_output(self, latents: torch.Tensor) -> torch.Tensor:
        return self._gather_share(latents)

    def prepare_latents(
        self, shape: tuple[int, ...], latents: Any = None, generator: Generators = None
    ) -> torch.Tensor:
        """The starting Gaussian draw of ``shape``: ``latents=`` (numpy, checked) or noise from ``generator``."""
        start = sd.check_latents(latents, shape)
        if start is None:
            return randn_tensor(shape, generator, dtype=self.unet.dtype, device=self.device)
        return self._as_tensor(start)

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

    def _generate(
        self,
        request: SDRequest,
        inputs: dict[str, Any],
        generator: Generators,
        callback: StepCallback | None,
        return_dict: bool,
        opts: tuple = (),
        scalars: tuple = (),
    ) -> ImagePipelineOutput | tuple:
        """Run the recipe's hooks in the Python loop over ``inputs`` (``context`` and per-image arrays), decode."""
        inputs = {name: value.to(self.unet.dtype) for name, value in inputs.items()}
        noise_shape = tuple(inputs["noise"].shape)  # (N, C, h, w): the whole call's images
        part = self._process_share(noise_shape[0])  # enable_distributed: this process's images
        if part is not None:
            inputs = images_of_inputs(inputs, part, request.guidance.parts)
            if part.start == part.stop:  # more processes than images: nothing to denoise here, only the gather
                return self._decode(inputs["noise"], request.output_type, return_dict)
        opts = dict(opts)
        state, first = self._schedule(request.num_inference_steps, inputs["noise"], opts)
        opts.update(first=first, num_calls=int(state.timesteps.shape[0]))
        opts.update(stop=self._stop(state, opts))
        nets = {name: getattr(self, name) for name in self._loop_networks}
        model_fn = self._model_fn(nets, inputs, request.guidance, dict(scalars), state, opts)
        step_callback = None
        if callback is not None:

            def step_callback(i: int, sample: torch.Tensor, st: Any) -> torch.Tensor | None:
                returned = callback(self, i, st.timesteps[i], {"latents": sample})
                return returned.get("latents") if isinstance(returned, dict) else None

        x, _ = denoise_loop(
            self.scheduler,
            model_fn,
            self._start(inputs, state, opts),
            state,
            generator=generator,
            noise_fn=self._share_noise(part, noise_shape, generator, self.unet.dtype),
            step_kwargs=sd.step_kwargs(self.scheduler, request.eta),
            progress=not self.progress_bar_disabled,
            callback=step_callback,
            index_model_fn=True,
            post_step=self._post_step(inputs, opts),
            stop=opts["stop"],
        )
        return self._decode(x, request.output_type, return_dict)
