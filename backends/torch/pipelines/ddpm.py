"""``DDPMPipeline`` and ``DDIMPipeline`` (unconditional pixel-space sampling) for PyTorch."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import unconditional as uc
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.sampling import Generators, denoise_loop, randn_tensor


class _UnconditionalPipeline(DiffusionPipeline):
    """Shared call flow: noise (or ``latents``) -> scheduler loop over the UNet -> images."""

    _components = ("unet", "scheduler")
    _splits_over_processes = True

    def _unet_call(self, sample: torch.Tensor, t: Any, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(sample, t, class_labels=class_labels)

    def _sample(self, request: uc.UnconditionalRequest, generator: Generators, return_dict: bool):
        device, dtype = self.device, self.unet.dtype
        labels = request.class_labels
        y = None if labels is None else torch.from_numpy(labels).to(device)
        if request.latents is None:
            x = randn_tensor(request.shape, generator, dtype=dtype, device=device)
        else:
            x = torch.from_numpy(request.latents).to(device=device, dtype=dtype)
        part = self._process_share(x.shape[0])  # enable_distributed: this process's images
        if part is not None:
            x, y = x[part], None if y is None else y[part]
        if x.shape[0]:  # a process with no image (more processes than images) only joins the gather
            x = self._denoise(request, x, y, generator, self._share_noise(part, request.shape, generator, dtype))
        return uc.finish(self._gather_share(x.float().cpu().numpy()), request.output_type, return_dict)

    def _denoise(self, request: uc.UnconditionalRequest, x: torch.Tensor, y, generator: Generators, noise_fn):
        state = self.scheduler.set_timesteps(request.num_inference_steps, like=x)
        x, _ = denoise_loop(
            self.scheduler,
            uc.class_model(self._unet_call, y, request.guiding_label, request.guidance_scale),
            x * state.init_noise_sigma,
            state,
            generator=generator,
            noise_fn=noise_fn,
            step_kwargs=request.step_kwargs,
            progress=not self.progress_bar_disabled,
        )
        return x


class DDPMPipeline(_UnconditionalPipeline):
    """Ancestral sampling with the pipeline's scheduler (Ho et al. 2020); diffusers' ``DDPMPipeline``."""

    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        num_inference_steps: int = uc.DDPM_DEFAULT_STEPS,
        latents: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Any = None,
        guidance_scale: float = 1.0,
        unconditional_class_label: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images; ``latents`` (numpy, (B, C, H, W)) fixes the starting noise.

        ``class_labels`` (int or one per image) picks the classes of a class-conditional UNet; ``guidance_scale``
        > 1 guides toward them against ``unconditional_class_label``, the "no class" label of a model trained with
        class dropout (a folder's ``classes.json`` names it: ``unconditional.read_class_info``).
        """
        request = uc.unconditional_request(
            self.unet.config, self.scheduler, batch_size=batch_size, num_inference_steps=num_inference_steps,
            latents=latents, output_type=output_type, class_labels=class_labels, guidance_scale=guidance_scale,
            unconditional_class_label=unconditional_class_label,
        )  # fmt: skip
        return self._sample(request, generator, return_dict)


class DDIMPipeline(_UnconditionalPipeline):
    """DDIM sampling (Song et al. 2021); the scheduler given at construction is converted to DDIM, as diffusers."""

    def __init__(self, unet: Any, scheduler: Any) -> None:
        super().__init__(unet=unet, scheduler=uc.as_ddim(scheduler))

    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        eta: float = 0.0,
        num_inference_steps: int = uc.DDIM_DEFAULT_STEPS,
        use_clipped_model_output: bool | None = None,
        latents: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Any = None,
        guidance_scale: float = 1.0,
        unconditional_class_label: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images; ``eta`` in [0, 1] blends DDIM (0) toward DDPM (1)."""
        request = uc.unconditional_request(
            self.unet.config, self.scheduler, batch_size=batch_size, num_inference_steps=num_inference_steps,
            latents=latents, output_type=output_type, eta=eta, use_clipped_model_output=use_clipped_model_output,
            class_labels=class_labels, guidance_scale=guidance_scale,
            unconditional_class_label=unconditional_class_label,
        )  # fmt: skip
        return self._sample(request, generator, return_dict)
