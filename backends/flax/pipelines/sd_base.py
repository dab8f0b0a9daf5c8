"""The Flax hooks every Stable Diffusion pipeline shares: text encoding, per-image keys and rows, the compiled
guided denoising program, and VAE decoding.

Argument checks, tokenization, guidance and latent conventions come from the framework-neutral recipe
(``diffusion_core.pipelines.stable_diffusion`` / ``sd_image``). Image ``b`` of a call starts from
``normal(fold_in(key, b))`` (or row ``b`` of ``latents=``) and draws its step noise from the same key, so the
images do not depend on ``parallel="pmap"`` / ``mesh=``. A pipeline overrides the hooks ``_inputs``
(per-image arrays), ``_start`` (latents entering the loop), ``_extra`` (extra UNet input channels) and
``_model_fn`` (ControlNet, upscalers); ``Run.strength`` starts img2img / inpaint mid-schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, run_program, scale_out_mode
from diffusion_core.flax.pipelines.sd_program import (
    encode_text,
    pack_rows,
    unpack_rows,
    vae_decode,
)
from diffusion_core.flax.sampling import denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import ImagePipelineOutput, sd_image
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.image import images_to_output

_GUIDANCE_FIELDS = frozenset(f.name for f in dataclasses.fields(sd.Guidance))


def call_options(steps: int, images_per_prompt: int, eta: float, output_type: str, clip_skip: int | None) -> dict:
    """The options ``sd.check_call_options`` validates, by name."""
    return dict(
        num_inference_steps=steps,
        num_images_per_prompt=images_per_prompt,
        eta=eta,
        output_type=output_type,
        clip_skip=clip_skip,
    )


def guided_to_rows(x: jax.Array, parts: int) -> jax.Array:
    """(parts * N, ...) in guidance-batch order -> (N, parts, ...): image b's rows side by side."""
    return jnp.swapaxes(x.reshape((parts, x.shape[0] // parts) + x.shape[1:]), 0, 1)


def rows_to_guided(x: jax.Array) -> jax.Array:
    """(b, parts, ...) per-image rows -> (parts * b, ...) in guidance-batch order (diffusers' ``cat([neg, pos])``)."""
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


@dataclasses.dataclass(frozen=True)
class Run:
    """One call's resolved options: what the compiled program and the decode step need."""

    guidance: sd.Guidance
    latent_shape: tuple[int, int, int, int]  # (N, C, h, w): N = prompts * num_images_per_prompt
    num_inference_steps: int
    step_kwargs: tuple[tuple[str, Any], ...]
    mode: str  # "single", "pmap" or "mesh"
    mesh: Mesh | None
    scalars: tuple[tuple[str, float], ...] = ()  # batch-wide numbers traced into the program (guidance scales)
    strength: float | None = None  # img2img / inpaint: how much of the schedule runs (None: all of it)
    first: int = 0  # first model call, resolved from ``strength`` by ``_denoise``
    num_calls: int = 0  # model calls in the schedule, resolved by ``_denoise``
    schedule: tuple = ()  # custom ("timesteps" | "sigmas", values) replacing num_inference_steps (text to image)
    static: tuple = ()  # further static options a pipeline's program depends on


class StableDiffusionBase(DiffusionPipeline):
    """Shared call flow: encode prompts -> per-image rows -> compiled denoising scan -> VAE decode -> output."""

    _components = sd.SD_COMPONENTS
    _optional_components = sd.SD_OPTIONAL
    _indexed_model_fn = False  # True: ``_model_fn`` returns ``(x, t, i)`` functions (i: the model-call index)
    # Outdated scheduler options this pipeline rewrites at construction, as diffusers' (sd.legacy_scheduler_config).
    _legacy_scheduler_options: tuple[str, ...] = ()

    def __init__(self, **components: Any) -> None:
        super().__init__(**components)
        self.scheduler = sd.updated_scheduler(self.scheduler, self._legacy_scheduler_options, type(self).__name__)

    @property
    def vae_scale_factor(self) -> int:
        return sd.vae_scale_factor(self.vae.config)

    # --- text -----------------------------------------------------------------------------------------

    def _encode_ids(self, ids: np.ndarray, clip_skip: int | None) -> jax.Array:
        """(B, L) ids -> (B, L, D) text embeddings (the recipe's ``encode`` hook)."""
        return encode_text(self.text_encoder, jnp.asarray(ids), clip_skip)

    def encode_prompt(
        self,
        prompt: Any,
        num_images_per_prompt: int,
        guidance: sd.Guidance,
        negative_prompt: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
    ) -> jax.Array:
        """The UNet's text context (parts * N, L, D) in diffusers' batch order (``cat([neg, pos])`` for CFG)."""
        given = [None if e is None else jnp.asarray(e, jnp.float32) for e in (prompt_embeds, negative_prompt_embeds)]
        pos, neg = sd.encode_prompts(
            self._encode_ids, self.tokenizer, prompt, negative_prompt, given[0], given[1], guidance.parts > 1, clip_skip
        )
        return sd.batch_embeddings(pos, neg, num_images_per_prompt, guidance)

    def _common_checks(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, options: dict) -> int:
        """Validate the arguments every SD pipeline shares; returns the prompt batch size."""
        batch = sd.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        sd.check_call_options(text_config=self.text_encoder.config, **options)
        return batch

    # --- hooks (text-to-image here; the image pipelines override them) ---------------------------------

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        """Per-image inputs besides the text context, each (N, ...): here the starting Gaussian draw."""
        noise = per_example_normal(keys, run.latent_shape[1:]) if start is None else jnp.asarray(start, jnp.float32)
        return {"noise": noise}

    def _start(self, inputs: dict, state: Any, run: Run) -> jax.Array:
        """Latents entering the loop: the Gaussian draw times ``init_noise_sigma``."""
        return inputs["noise"] * state.init_noise_sigma

    def _extra(self, inputs: dict, guidance: sd.Guidance) -> jax.Array | None:
        """Channels appended to the UNet input, (parts * b, C_extra, h, w), or None."""
        return None

    def _model_fn(
        self, nets: dict, inputs: dict, guidance: sd.Guidance, run: Run, scalars: dict, state: Any
    ) -> Callable:
        """``(scaled x, t) -> guided model output`` for the scan; ``scalars`` are the traced ``run.scalars``,
        ``state`` the scheduler state the loop starts from."""
        unet, context, extra = nets["unet"], inputs["context"], self._extra(inputs, guidance)

        def model_fn(x, t):
            return sd.combine(unet(sd.model_input(x, guidance, extra), t, context), guidance)

        return model_fn

    def _vae_config(self) -> dict[str, Any]:
        """The VAE config the latents are decoded with (the x4 upscaler forces its scaling factor)."""
        return self.vae.config

    def _post_step(self, inputs: dict, run: Run) -> Callable | None:
        """``(x, new state) -> x`` applied after every scheduler step, or None (4-channel inpainting overrides)."""
        return None

    def _networks(self) -> dict[str, nnx.Module]:
        """The networks the denoising program calls."""
        return {"unet": self.unet}

    def _needs_key(self, options: dict) -> bool:
        """Whether the call draws randomness besides the start/step noise (VAE posterior samples)."""
        return False

    # --- the call flow --------------------------------------------------------------------------------

    def _run(self, guidance, size, batch: int, steps: int, eta: float, parallel, mesh, **fields) -> Run:
        """Resolve a call's options; ``size`` is the (height, width) in pixels, ``batch`` the image count."""
        mode = scale_out_mode(parallel, mesh)
        channels = fields.pop("channels", int(self.unet.config["in_channels"]))
        shape = sd.latent_shape(batch, channels, size[0], size[1], self.vae_scale_factor)
        step_options = tuple(sorted(sd.step_kwargs(self.scheduler, eta).items()))
        return Run(guidance, shape, steps, step_options, mode, mesh, **fields)

    def _keys(self, key: Any, run: Run, latents: Any, options: dict) -> tuple[jax.Array, np.ndarray | None]:
        start = sd.check_latents(latents, run.latent_shape)
        needs = self.scheduler.needs_noise_for(**dict(run.step_kwargs)) or self._needs_key(options)
        if key is None and (start is None or needs):
            raise ValueError("key: pass key=jax.random.key(seed) (needed to draw the starting, step or VAE noise)")
        return per_example_keys(key if key is not None else jax.random.key(0), run.latent_shape[0]), start

    def _denoise(self, run: Run, context: jax.Array, key: Any, latents: Any, options: dict) -> jax.Array:
        """Run the compiled program over the batch; returns the final latents (N, C, h, w)."""
        keys, start = self._keys(key, run, latents, options)
        per_image = guided_to_rows(context, run.guidance.parts)  # (N, parts, L, D)
        rows, unravel, signature = pack_rows({"context": per_image, **self._inputs(run, keys, start, options)})
        nets = self._networks()
        graphdefs, params = {}, {}
        for name, net in nets.items():
            graphdefs[name], params[name] = nnx.split(net)

        def make_state(like):
            return self._schedule(run, like.shape[0])[0]

        state, first = self._schedule(run, 1)
        run = dataclasses.replace(run, first=first, num_calls=int(state.timesteps.shape[0]))
        traced = dict(run.scalars)
        untraced = dataclasses.replace(run.guidance, **dict.fromkeys(_GUIDANCE_FIELDS & set(traced), 0.0))
        static: Hashable = (
            type(self).__name__,
            self._scheduler_key(),
            not self.progress_bar_disabled,
            signature,
            dataclasses.replace(
                run,
                guidance=untraced,
                latent_shape=(),
                num_inference_steps=0,
                scalars=tuple(traced),
                mesh=None,
                schedule=run.schedule[:1],  # the values live in the (traced) scheduler state
            ),  # fmt: skip
            tuple((name, id(net)) for name, net in nets.items()),
        )
        fn = self.compiled(run.mode, run.mesh, static, lambda: self._build(graphdefs, unravel, run))
        scalars = {name: jnp.asarray(value, jnp.float32) for name, value in traced.items()}

        self._progress.start(run.num_calls, disable=self.progress_bar_disabled, initial=run.first)
        try:
            return jax.block_until_ready(run_program(fn, run.mode, run.mesh, (params, scalars), make_state, rows, keys))
        finally:
            self._progress.close()

    def _schedule(self, run: Run, batch: int) -> tuple[Any, int]:
        """``(scheduler state, first model call)`` for ``batch`` latents; ``strength`` starts mid-schedule."""
        like = jnp.zeros((batch,) + run.latent_shape[1:], jnp.float32)  # the (per-device) latent batch
        if run.schedule:
            return self.scheduler.set_timesteps(like=like, **{run.schedule[0]: np.asarray(run.schedule[1])}), 0
        if run.strength is None:
            return self.scheduler.set_timesteps(run.num_inference_steps, like=like), 0
        return sd_image.start_state(self.scheduler, run.num_inference_steps, run.strength, like)

    def _build(self, graphdefs: dict, unravel: Callable, run: Run) -> Callable:
        scheduler, progress, step_kwargs = self.scheduler, self.progress_for_trace(), dict(run.step_kwargs)

        def program(params, state, rows, keys):
            self.trace_count += 1  # runs at trace time only
            net_params, scalars = params
            nets = {name: nnx.merge(graphdefs[name], net_params[name]) for name in graphdefs}
            inputs = unpack_rows(rows, unravel)
            inputs["context"] = rows_to_guided(inputs["context"])  # (parts * b, L, D)
            guidance = dataclasses.replace(run.guidance, **{k: v for k, v in scalars.items() if k in _GUIDANCE_FIELDS})
            x = self._start(inputs, state, run)
            model_fn = self._model_fn(nets, inputs, guidance, run, scalars, state)
            post_step = self._post_step(inputs, run)
            loop_options = dict(keys=keys, step_kwargs=step_kwargs, progress=progress, first=run.first)
            loop_options.update(index_model_fn=self._indexed_model_fn, post_step=post_step)
            return denoise_loop(scheduler, model_fn, x, state, **loop_options)[0]

        return program

    def _decode(self, latents: jax.Array, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """Final latents -> images of ``output_type`` (``"latent"`` returns the latents as numpy)."""
        # Gathered to the host first: nnx.jit writes the VAE's state back with its inputs' sharding, so decoding
        # pmap/mesh-sharded latents would leave the VAE's weights on that device set.
        latents = np.asarray(jax.device_get(latents))  # (N, C, h, w)
        if output_type == "latent":
            images = latents
        else:
            decoded = vae_decode(self.vae, sd.unscale_latents(jnp.asarray(latents), self._vae_config()))
            images = images_to_output(np.asarray(jax.device_get(decoded)), output_type)  # decoded: (N, 3, H, W)
        return ImagePipelineOutput(images) if return_dict else (images,)
