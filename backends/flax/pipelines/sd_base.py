"""The Flax primitives every Stable Diffusion pipeline shares: text encoding, per-image keys and rows, the compiled
denoising program that runs the recipe's hooks, and VAE decoding.

The pipelines themselves (request checks, schedule, start latents, extra channels, model function, post-step hook,
decode) are the core recipes (``diffusion_core.pipelines.sd_recipe`` / ``sd_recipes``). Image ``b`` of a call starts
from ``normal(fold_in(key, b))`` (or row ``b`` of ``latents=``) and draws its step noise from the same key, so the
images do not depend on ``parallel="pmap"`` / ``mesh=``. A pipeline adds ``_inputs`` (per-image arrays).
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

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, scale_out_mode
from diffusion_core.flax.pipelines.sd_program import encode_text, pack_rows, unpack_rows, vae_decode
from diffusion_core.flax.sampling import denoise_loop, per_example_keys, per_example_normal
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines.sd_recipe import GUIDED_INPUTS, SDRequest, StableDiffusionRecipe

_GUIDANCE_FIELDS = frozenset(f.name for f in dataclasses.fields(sd.Guidance))


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
    opts: tuple[tuple[str, Any], ...] = ()  # the recipe's static options (strength, custom schedule, switches)
    first: int = 0  # first model call, resolved by ``_denoise``
    num_calls: int = 0  # model calls in the schedule, resolved by ``_denoise``
    stop: int | None = None  # the model call the loop ends before (SDXL's denoising_end), resolved by ``_denoise``

    def hook_opts(self) -> dict[str, Any]:
        return {**dict(self.opts), "first": self.first, "num_calls": self.num_calls, "stop": self.stop}


class StableDiffusionBase(StableDiffusionRecipe, DiffusionPipeline):
    """Flax primitives of the SD recipes: text encoding, per-image rows, the compiled loop, VAE decoding."""

    # --- backend primitives ----------------------------------------------------------------------------

    def _encode_ids(self, ids: np.ndarray, clip_skip: int | None) -> jax.Array:
        """(B, L) ids -> (B, L, D) text embeddings (the recipe's ``encode`` hook)."""
        return encode_text(self.text_encoder, jnp.asarray(ids), clip_skip)

    def _embeds_array(self, value: Any) -> jax.Array:
        return jnp.asarray(value, jnp.float32)

    def _vae_decode(self, z: Any) -> np.ndarray:
        # Gathered to the host first: nnx.jit writes the VAE's state back with its inputs' sharding, so decoding
        # pmap/mesh-sharded latents would leave the VAE's weights on that device set.
        z = jnp.asarray(np.asarray(jax.device_get(z)))  # (N, C, h, w)
        return np.asarray(jax.device_get(vae_decode(self._decoding_vae(), z)))  # (N, 3, H, W)

    def _decoding_vae(self) -> nnx.Module:
        """The VAE that decodes (SDXL: a float32 copy of a float16 VAE whose config says ``force_upcast``)."""
        return self.vae

    def _latent_output(self, latents: Any) -> np.ndarray:
        return np.asarray(jax.device_get(latents))

    def prepare_latents(self, shape: tuple[int, ...], latents: Any = None, keys: jax.Array | None = None) -> jax.Array:
        """The starting Gaussian draw of ``shape``: ``latents=`` (numpy, checked) or row ``b`` from ``keys[b]``."""
        start = sd.check_latents(latents, shape)
        return per_example_normal(keys, tuple(shape[1:])) if start is None else jnp.asarray(start, jnp.float32)

    def _inputs(self, run: Run, keys: jax.Array, start: np.ndarray | None, options: dict) -> dict[str, Any]:
        """Per-image inputs besides the text context, each (N, ...): here the starting Gaussian draw."""
        return {"noise": self.prepare_latents(run.latent_shape, start, keys)}

    def _placeholder_call(self, batch_size: int) -> dict[str, Any]:
        return {"prompt": [""] * batch_size}

    def _needs_key(self, options: dict) -> bool:
        """Whether the call draws randomness besides the start/step noise (VAE posterior samples)."""
        return False

    # --- the call flow --------------------------------------------------------------------------------

    def _run(self, request: SDRequest, size, parallel, mesh, *, channels: int | None = None, **fields) -> Run:
        """Resolve a call's options; ``size`` is the (height, width) in pixels."""
        mode = scale_out_mode(parallel, mesh)
        channels = int(self.unet.config["in_channels"]) if channels is None else channels
        shape = sd.latent_shape(request.batch, channels, size[0], size[1], self.vae_scale_factor)
        step_options = tuple(sorted(sd.step_kwargs(self.scheduler, request.eta).items()))
        fields.setdefault("scalars", request.scalars)
        return Run(request.guidance, shape, request.num_inference_steps, step_options, mode, mesh, **fields)

    def _keys(self, key: Any, run: Run, latents: Any, options: dict) -> tuple[jax.Array, np.ndarray | None]:
        start = sd.check_latents(latents, run.latent_shape)
        needs = self.scheduler.needs_noise_for(**dict(run.step_kwargs)) or self._needs_key(options)
        if key is None and (start is None or needs):
            raise ValueError("key: pass key=jax.random.key(seed) (needed to draw the starting, step or VAE noise)")
        return per_example_keys(key if key is not None else jax.random.key(0), run.latent_shape[0]), start

    def _generate(self, run: Run, request: SDRequest, key: Any, latents: Any, options: dict, return_dict: bool):
        """Encode the prompts, run the compiled program, decode: the tail of every SD ``__call__``."""
        context = options.pop("context", None)
        if context is None:
            context = self._context(request)
        return self._decode(self._denoise(run, context, key, latents, options), request.output_type, return_dict)

    def _denoise(self, run: Run, context: jax.Array, key: Any, latents: Any, options: dict) -> jax.Array:
        """Run the compiled program over the batch; returns the final latents (N, C, h, w)."""
        keys, start = self._keys(key, run, latents, options)
        inputs = {"context": context, **self._inputs(run, keys, start, options)}
        # inputs in guidance-batch order (parts * N, ...) travel as per-image rows (N, parts, ...)
        inputs = {k: guided_to_rows(v, run.guidance.parts) if k in GUIDED_INPUTS else v for k, v in inputs.items()}
        rows, unravel, signature = pack_rows(inputs)
        nets = {name: getattr(self, name) for name in self._loop_networks}
        graphdefs, params = {}, {}
        for name, net in nets.items():
            graphdefs[name], params[name] = nnx.split(net)

        def make_state(like):
            return self._state(run, like.shape[0])[0]

        state, first = self._state(run, 1)
        run = dataclasses.replace(run, first=first, num_calls=int(state.timesteps.shape[0]))
        run = dataclasses.replace(run, stop=self._stop(state, run.hook_opts()))
        traced = dict(run.scalars)
        untraced = dataclasses.replace(run.guidance, **dict.fromkeys(_GUIDANCE_FIELDS & set(traced), 0.0))
        opts = tuple((k, tuple(n for n, _ in v) if k == "custom" else v) for k, v in run.opts)  # values are traced
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
                opts=opts,
            ),  # fmt: skip
            tuple((name, id(net)) for name, net in nets.items()),
        )
        fn = self.compiled(run.mode, run.mesh, static, lambda: self._build(graphdefs, unravel, run))
        scalars = {name: jnp.asarray(value, jnp.float32) for name, value in traced.items()}

        self._progress.start(run.num_calls, disable=self.progress_bar_disabled, initial=run.first)
        try:
            return self.run_program(fn, run.mode, run.mesh, params, scalars, make_state, rows, keys)
        finally:
            self._progress.close()

    def _state(self, run: Run, batch: int) -> tuple[Any, int]:
        """``(scheduler state, first model call)`` for a (per-device) batch of ``batch`` latents."""
        like = jnp.zeros((batch,) + run.latent_shape[1:], jnp.float32)
        return self._schedule(run.num_inference_steps, like, dict(run.opts))

    def _build(self, graphdefs: dict, unravel: Callable, run: Run) -> Callable:
        scheduler, progress, step_kwargs = self.scheduler, self.progress_for_trace(), dict(run.step_kwargs)
        opts = run.hook_opts()

        def program(params, state, rows, keys):
            self.trace_count += 1  # runs at trace time only
            net_params, scalars = params
            nets = {name: nnx.merge(graphdefs[name], net_params[name]) for name in graphdefs}
            inputs = unpack_rows(rows, unravel)
            inputs = {k: rows_to_guided(v) if k in GUIDED_INPUTS else v for k, v in inputs.items()}
            guidance = dataclasses.replace(run.guidance, **{k: v for k, v in scalars.items() if k in _GUIDANCE_FIELDS})
            x = self._start(inputs, state, opts)
            model_fn = self._model_fn(nets, inputs, guidance, scalars, state, opts)
            loop_options = dict(keys=keys, step_kwargs=step_kwargs, progress=progress, first=run.first)
            loop_options.update(index_model_fn=True, post_step=self._post_step(inputs, opts), stop=run.stop)
            return denoise_loop(scheduler, model_fn, x, state, **loop_options)[0]

        return program
