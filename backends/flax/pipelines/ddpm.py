"""``DDPMPipeline`` and ``DDIMPipeline`` (unconditional pixel-space sampling) for Flax NNX.

The whole denoising loop is one compiled ``lax.scan``; image ``b`` starts from
``normal(fold_in(key, b))`` and draws its step noise from that key too, so results do not depend on
``parallel="pmap"`` / ``mesh=`` or the device count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, Program, scale_out_mode
from diffusion_core.flax.pipelines.sd_program import pack_rows, unpack_rows
from diffusion_core.flax.sampling import denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput
from diffusion_core.pipelines import unconditional as uc


class _UnconditionalPipeline(DiffusionPipeline):
    """Shared call flow: per-image noise (or ``latents``) -> compiled scheduler loop -> images."""

    _components = ("unet", "scheduler")

    def _build(self, graphdef: Any, step_kwargs: dict[str, Any], unravel: Any) -> Program:
        scheduler, progress = self.scheduler, self.progress_for_trace()

        def program(params, state, rows, keys):
            self.trace_count += 1  # runs at trace time only
            unet = nnx.merge(graphdef, params[0])
            scalars, inputs = params[1], unpack_rows(rows, unravel)
            labels = inputs["class_labels"].astype(jnp.int32) if "class_labels" in inputs else None
            null = scalars["unconditional_class_label"].astype(jnp.int32) if scalars else None  # traced: no recompile
            model = uc.class_model(
                lambda sample, t, y: unet(sample, t, class_labels=y), labels, null, scalars.get("guidance_scale")
            )
            x, _ = denoise_loop(
                scheduler, model, inputs["sample"] * state.init_noise_sigma, state, keys=keys,
                step_kwargs=step_kwargs, progress=progress,
            )  # fmt: skip
            return x

        return program

    def _sample(self, request: uc.UnconditionalRequest, key, return_dict: bool, parallel, mesh):
        mode = scale_out_mode(parallel, mesh)
        step_kwargs = dict(request.step_kwargs)
        if key is None and (request.latents is None or self.scheduler.needs_noise_for(**step_kwargs)):
            raise ValueError("key: pass key=jax.random.key(seed) (needed to draw the starting or step noise)")
        keys = per_example_keys(key if key is not None else jax.random.key(0), request.shape[0])
        start = request.latents
        inputs = {"sample": per_example_normal(keys, request.shape[1:]) if start is None else jnp.asarray(start)}
        if request.class_labels is not None:  # per-image inputs: a new label set neither retraces nor recompiles
            inputs["class_labels"] = request.class_labels
        rows, unravel, signature = pack_rows(inputs)
        scalars = {}
        if request.guiding_label is not None:  # guidance needs class labels (checked by the request)
            scalars = {
                "guidance_scale": jnp.float32(request.guidance_scale),
                "unconditional_class_label": jnp.float32(request.unconditional_class_label),
            }
        graphdef, params = nnx.split(self.unet)
        static = (
            self._scheduler_key(), tuple(sorted(step_kwargs.items())), not self.progress_bar_disabled, signature,
            bool(scalars),
        )  # fmt: skip
        fn = self.compiled(mode, mesh, static, lambda: self._build(graphdef, step_kwargs, unravel))

        def make_state(rows_like):  # the scheduler state of a per-program batch of samples
            like = jnp.zeros((rows_like.shape[0],) + request.shape[1:], jnp.float32)
            return self.scheduler.set_timesteps(request.num_inference_steps, like=like)

        self._progress.start(request.num_inference_steps, disable=self.progress_bar_disabled)
        try:
            out = self.run_program(fn, mode, mesh, params, scalars, make_state, rows, keys)
            out = np.asarray(jax.device_get(out))
        finally:
            self._progress.close()
        return uc.finish(out, request.output_type, return_dict)


class DDPMPipeline(_UnconditionalPipeline):
    """Ancestral sampling with the pipeline's scheduler (Ho et al. 2020); diffusers' ``DDPMPipeline``."""

    def __call__(
        self,
        batch_size: int = 1,
        key: jax.Array | None = None,
        num_inference_steps: int = uc.DDPM_DEFAULT_STEPS,
        latents: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        parallel: str | None = None,
        mesh: Mesh | None = None,
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
        return self._sample(request, key, return_dict, parallel, mesh)


class DDIMPipeline(_UnconditionalPipeline):
    """DDIM sampling (Song et al. 2021); the scheduler given at construction is converted to DDIM, as diffusers."""

    def __init__(self, unet: Any, scheduler: Any) -> None:
        super().__init__(unet=unet, scheduler=uc.as_ddim(scheduler))

    def __call__(
        self,
        batch_size: int = 1,
        key: jax.Array | None = None,
        eta: float = 0.0,
        num_inference_steps: int = uc.DDIM_DEFAULT_STEPS,
        use_clipped_model_output: bool | None = None,
        latents: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        parallel: str | None = None,
        mesh: Mesh | None = None,
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
        return self._sample(request, key, return_dict, parallel, mesh)
