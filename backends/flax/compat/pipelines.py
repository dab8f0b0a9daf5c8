"""diffusers 0.39's Flax pipeline API (``FlaxStableDiffusionPipeline``) over our native Flax pipelines.

    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(path, dtype=jnp.bfloat16, safety_checker=None)
    prompt_ids = shard(pipeline.prepare_inputs(prompts))        # (n_devices, B / n_devices, 77)
    images = pipeline(prompt_ids, replicate(params), jax.random.split(key, n_devices), jit=True).images

The call maps onto the native pipeline's public ``__call__``: token ids become text embeddings through
``params["text_encoder"]`` (as 0.39 encoded them), the start latents are drawn as 0.39 drew them
(``jax.random.normal(prng_seed, (B, C, h, w))``, per device under ``jit=True``) and passed as
``latents=``, and ``jit=True`` runs the native ``parallel="pmap"`` path. ``params["scheduler"]`` (0.39's
scheduler state) is not read: the native pipeline sets its own timesteps for ``num_inference_steps``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax import pipelines as native_pipelines
from diffusion_core.flax.compat import models as compat_models
from diffusion_core.flax.compat import schedulers as compat_schedulers
from diffusion_core.pipelines import image as image_utils
from diffusion_core.pipelines import stable_diffusion as sd

# native component attribute -> compat model class (the pipeline's ``params`` keys, as 0.39 named them)
_MODEL_COMPONENTS: dict[str, type[compat_models.FlaxModelCompat]] = {
    "unet": compat_models.FlaxUNet2DConditionModel,
    "vae": compat_models.FlaxAutoencoderKL,
    "text_encoder": compat_models.FlaxCLIPTextModel,
    "controlnet": compat_models.FlaxControlNetModel,
}
_SCHEDULERS = {cls._native_name: cls for cls in compat_schedulers.SCHEDULER_CLASSES}


@dataclass(frozen=True)
class FlaxStableDiffusionPipelineOutput:
    """0.39's pipeline output: ``images`` (numpy, channels-last, in [0, 1]) and the safety flags (always False)."""

    images: np.ndarray
    nsfw_content_detected: Any = False

    def __getitem__(self, index: int) -> Any:  # 0.39 scripts wrote ``pipeline(...)[0]``
        return (self.images, self.nsfw_content_detected)[index]


def compat_scheduler(native: Any) -> compat_schedulers.FlaxSchedulerCompat:
    """The 0.39 scheduler class wrapping ``native``; ValueError where 0.39 had no Flax twin."""
    cls = _SCHEDULERS.get(type(native).__name__)
    if cls is None:
        raise ValueError(
            f"scheduler: {type(native).__name__} had no Flax class in diffusers 0.39; "
            f"accepted: {sorted(c.__name__ for c in _SCHEDULERS.values())} (or use the native pipeline)"
        )
    return cls.from_native(native)


class FlaxDiffusionPipeline:
    """0.39's ``FlaxDiffusionPipeline``: ``from_pretrained`` dispatches on ``model_index.json``'s class name."""

    _native_class: ClassVar[type] = native_pipelines.DiffusionPipeline

    def __init__(self, native: Any) -> None:
        if not isinstance(native, self._native_class):
            raise ValueError(f"native: {type(self).__name__} wraps a {self._native_class.__name__}, got {type(native)}")
        self.native = native
        native.set_progress_bar_config(disable=True)
        self._models: dict[str, tuple[compat_models.FlaxModelCompat, Any]] = {}
        for name, cls in _MODEL_COMPONENTS.items():
            module = getattr(native, name, None)
            if module is not None:
                self._models[name] = cls.from_native(module)
                setattr(self, name, self._models[name][0])
        self.tokenizer = native.tokenizer
        self._applied: Any = None  # the params dict last put into the native networks
        self.scheduler = compat_scheduler(native.scheduler)
        self.safety_checker = None
        self.dtype = getattr(native.unet, "dtype", jnp.float32)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: Any = jnp.float32,
        revision: str | None = None,
        from_pt: bool = False,
        safety_checker: Any = None,
        **kwargs: Any,
    ):
        """``(pipeline, params)``; ``params`` holds one entry per network plus ``"scheduler"`` (its state).

        ``scheduler=`` takes a compat scheduler (0.39's swap). ``from_pt`` is accepted (PyTorch-layout weights
        are what loads natively); a safety checker is not carried: pass ``safety_checker=None``.
        """
        if safety_checker is not None:
            raise ValueError("safety_checker: not carried by diffusion_core; pass safety_checker=None")
        scheduler = kwargs.pop("scheduler", None)
        if scheduler is not None:
            if not isinstance(scheduler, compat_schedulers.FlaxSchedulerCompat):
                raise ValueError(f"scheduler: expected a Flax*Scheduler from this module, got {type(scheduler)}")
            kwargs["scheduler"] = scheduler.native
        native = cls._native_class.from_pretrained(
            pretrained_model_name_or_path, revision=revision, dtype=dtype, safety_checker=None, **kwargs
        )
        pipe = compat_pipeline_class(native, cls)(native)
        params = {name: params for name, (_, params) in pipe._models.items()}
        params["scheduler"] = pipe.scheduler.create_state()
        return pipe, params

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list:
        """(B, H, W, C) floats in [0, 1] -> PIL images."""
        return image_utils.numpy_to_pil(images)

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict | None = None) -> None:
        """Write the pipeline folder (native layout); ``params`` (optional) are loaded into the networks first."""
        if params is not None:
            self._load_params(params, jit=False)
        self.native.save_pretrained(save_directory)

    def _load_params(self, params: Any, jit: bool) -> None:
        """Put the call's ``params`` into the native networks (``jit``: replicated, take device 0's copy)."""
        if not isinstance(params, dict):
            raise ValueError(f"params: expected the dict from from_pretrained, got {type(params).__name__}")
        missing = sorted(set(self._models) - set(params))
        if missing:
            raise ValueError(f"params: missing entries {missing}; pass the dict from from_pretrained")
        if params is self._applied:  # the same dict as the last call: already in place (no copy per call)
            return
        for name in self._models:
            values = params[name]
            if jit:  # flax.jax_utils.unreplicate, through the host once per params dict: uncommitted arrays, which
                # the native pmap/mesh paths place themselves (device-0-committed weights would pin them there)
                values = jax.tree_util.tree_map(lambda x: jnp.asarray(jax.device_get(x[0])), values)
            nnx.update(getattr(self.native, name), values)
        self._applied = params


class FlaxStableDiffusionPipeline(FlaxDiffusionPipeline):
    """0.39's ``FlaxStableDiffusionPipeline`` over the native ``StableDiffusionPipeline``."""

    _native_class = native_pipelines.StableDiffusionPipeline
    _native_sized: ClassVar[bool] = True  # the native call takes height/width (image pipelines: the image's size)

    def prepare_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """(B, 77) token ids, padded and truncated to the tokenizer's length (0.39's ``prepare_inputs``)."""
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt: expected a str or a list of str, got {type(prompt).__name__}")
        return sd.tokenize(self.tokenizer, sd.prompt_texts(prompt))

    def _latent_channels(self) -> int:
        """Channels of the start draw: the UNet's input (0.39's text-to-image and ControlNet pipelines)."""
        return int(self.native.unet.config["in_channels"])

    def _latent_hw(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latents of a (height, width) image."""
        return (size[0] // self.native.vae_scale_factor, size[1] // self.native.vae_scale_factor)

    def _embed(self, ids: Any, params: Any) -> jax.Array:
        """(B, L) ids -> (B, L, D) embeddings with ``params`` (0.39: ``text_encoder(ids, params=...)[0]``), jitted."""
        if getattr(self, "_jit_embed", None) is None:
            self._jit_embed = jax.jit(lambda p, i: self.text_encoder(i, params=p)[0])
        return self._jit_embed(params, jnp.asarray(ids))

    def _start_latents(self, prng_seed: Any, shape: tuple[int, ...], jit: bool) -> np.ndarray:
        """0.39's draw: ``normal(prng_seed, (B, C, h, w))``; under ``jit`` one draw of B / n per device key."""
        if not jit:
            return np.asarray(jax.random.normal(prng_seed, shape, dtype=jnp.float32))
        keys = jnp.asarray(prng_seed)
        per_device = (shape[0] // keys.shape[0], *shape[1:])
        return np.concatenate([np.asarray(jax.random.normal(k, per_device, dtype=jnp.float32)) for k in keys])

    def __call__(
        self,
        prompt_ids: Any,
        params: dict,
        prng_seed: Any,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | Any = 7.5,
        latents: Any = None,
        neg_prompt_ids: Any = None,
        return_dict: bool = True,
        jit: bool = False,
    ):
        """Generate (B, H, W, 3) images, or (n_devices, B / n, H, W, 3) with ``jit=True`` (inputs sharded)."""
        calls = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents)
        return self._generate(prompt_ids, params, prng_seed, (height, width), neg_prompt_ids, jit, return_dict, calls)

    def _generate(self, prompt_ids, params, prng_seed, size, neg_prompt_ids, jit, return_dict, calls, **native_kwargs):
        """0.39's call flow onto the native ``__call__``: text embeddings from ids, 0.39's start draw, pmap."""
        ids, devices = unshard(prompt_ids, "prompt_ids", jit)
        self._load_params(params, jit)
        text_params = nnx.state(self.native.text_encoder)
        pos = self._embed(ids, text_params)
        if neg_prompt_ids is None:
            neg_ids = sd.tokenize(self.tokenizer, [""] * ids.shape[0], max_length=ids.shape[1])
        else:
            neg_ids = unshard(neg_prompt_ids, "neg_prompt_ids", jit)[0]
        neg = self._embed(neg_ids, text_params)
        size = sd.resolve_size(size[0], size[1], self.native.unet.config, self.native.vae.config)
        shape = sd.latent_shape(ids.shape[0], self._latent_channels(), *size, self.native.vae_scale_factor)
        latents = calls["latents"]
        start = self._start_latents(prng_seed, shape, jit) if latents is None else unshard(latents, "latents", jit)[0]
        if self._native_sized:
            native_kwargs.update(height=size[0], width=size[1])
        out = self.native(
            prompt_embeds=np.asarray(pos),  # host arrays: the native pmap path places them itself
            negative_prompt_embeds=np.asarray(neg),
            num_inference_steps=calls["num_inference_steps"],
            guidance_scale=guidance_value(calls["guidance_scale"]),
            latents=np.asarray(start, dtype=np.float32),
            output_type="np",
            parallel="pmap" if jit else None,
            **native_kwargs,
        )
        images = np.asarray(out.images)
        if jit:
            images = images.reshape(devices, -1, *images.shape[1:])
        if not return_dict:
            return images, False
        return FlaxStableDiffusionPipelineOutput(images=images, nsfw_content_detected=False)


def unshard(value: Any, name: str, jit: bool) -> tuple[np.ndarray, int]:
    """``(array with the batch first, number of devices)``: under ``jit`` the input is ``shard``ed (n, B / n, ...)."""
    array = np.asarray(value)
    if not jit:
        return array, 1
    if array.ndim < 2:
        raise ValueError(
            f"{name}: with jit=True expected a sharded (n_devices, B / n_devices, ...) array, got {array.shape}"
        )
    return array.reshape(-1, *array.shape[2:]), int(array.shape[0])


def guidance_value(value: Any, name: str = "guidance_scale") -> float:
    """A float; 0.39 also took one value per image (or per device): they must all be equal here."""
    values = np.unique(np.asarray(value, dtype=np.float64))
    if values.size != 1:
        raise ValueError(f"{name}: one value for the whole batch is supported, got {values.tolist()}")
    return float(values[0])


# native pipeline class name -> compat class ("module:Class" under diffusion_core.flax.compat), for the dispatch
# of FlaxDiffusionPipeline.from_pretrained
_COMPAT_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "pipelines:FlaxStableDiffusionPipeline",
    "StableDiffusionControlNetPipeline": "image_pipelines:FlaxStableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "image_pipelines:FlaxStableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "image_pipelines:FlaxStableDiffusionInpaintPipeline",
}


def compat_pipeline_class(native: Any, default: type[FlaxDiffusionPipeline]) -> type[FlaxDiffusionPipeline]:
    """The compat class for a loaded native pipeline (``default`` where 0.39 had no Flax twin)."""
    target = _COMPAT_PIPELINES.get(type(native).__name__)
    if target is None:
        return default
    module, name = target.split(":")
    return getattr(importlib.import_module(f"diffusion_core.flax.compat.{module}"), name)
