"""diffusers 0.39's Flax model API (``(model, params)``, ``model.apply({"params": params}, ...)``) over our NNX models.

A compat model holds the native module's graph definition (``nnx.split``) and no weights; ``apply``
merges the given params back into a native module and calls it, so ``apply`` is a pure function
of the params (jit/pmap them as 0.39 scripts did). Outputs carry 0.39's field names.

    unet, params = FlaxUNet2DConditionModel.from_pretrained(path, subfolder="unet")
    eps = unet.apply({"params": params}, latents, t, text_embeds).sample
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.flax import models


@flax.struct.dataclass
class FlaxUNet2DConditionOutput:
    sample: jax.Array  # (B, C, H, W)


@flax.struct.dataclass
class FlaxDecoderOutput:
    sample: jax.Array  # (B, C, H, W)


@flax.struct.dataclass
class FlaxControlNetOutput:
    down_block_res_samples: tuple[jax.Array, ...]  # NCHW, one per UNet down skip
    mid_block_res_sample: jax.Array  # NCHW


@flax.struct.dataclass
class FlaxDiagonalGaussianDistribution:
    """0.39's VAE posterior: channels-last (B, h, w, C) ``mean``/``std``, ``sample(key)``, ``mode()``."""

    mean: jax.Array  # (B, h, w, C)
    logvar: jax.Array  # (B, h, w, C), clamped as the native posterior clamps it
    std: jax.Array  # (B, h, w, C)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape)

    def mode(self) -> jax.Array:
        return self.mean


@flax.struct.dataclass
class FlaxAutoencoderKLOutput:
    latent_dist: FlaxDiagonalGaussianDistribution


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


class FlaxModelCompat:
    """Abstract: 0.39's ``FlaxModelMixin`` calls (``apply``, ``init_weights``, ``save_pretrained``) over ``_native``."""

    _native: ClassVar[type]

    def __init__(self, graphdef: Any, config: Mapping[str, Any], dtype: Any = jnp.float32) -> None:
        self._graphdef = graphdef
        self.config = config
        self.dtype = dtype
        self._bound: nnx.Module | None = None

    @classmethod
    def from_native(cls, native: nnx.Module) -> tuple[FlaxModelCompat, Any]:
        """``(model, params)`` from a native module: its graph definition and its state."""
        if not isinstance(native, cls._native):
            raise ValueError(f"native: {cls.__name__} wraps a {cls._native.__name__}, got {type(native).__name__}")
        graphdef, params = nnx.split(native)
        return cls(graphdef, native.config, getattr(native, "dtype", jnp.float32)), params

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32, seed: int = 0):
        """``(model, params)`` with random weights from a diffusers/transformers config mapping."""
        return cls.from_native(cls._native.from_config(dict(config), rngs=nnx.Rngs(seed), dtype=dtype))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        revision: str | None = None,
        from_pt: bool = False,
        **kwargs: Any,
    ):
        """``(model, params)`` from a folder or Hub repo, read by the native loader: PyTorch-layout weights, or
        where there are none, the Flax ``*.msgpack`` weights (0.39's files; local or on the Hub).

        ``from_pt=True`` means what it meant in 0.39: read the PyTorch weights, and fail (FileNotFoundError naming
        ``from_pt``) where there are none, instead of falling back to ``*.msgpack``. ``from_pt=False`` reads the
        msgpack file where there is no PyTorch-layout one, and, unlike 0.39 (which refused with "load the model
        using from_pt=True"), also PyTorch-layout weights: they are what this library reads natively. Other
        keywords (``variant``, ``local_files_only``, ``allow_pickle``) go to the native ``from_pretrained``.
        """
        if not isinstance(from_pt, bool):
            raise ValueError(f"from_pt: must be True or False, got {from_pt!r}")
        if from_pt:
            cls._require_pytorch_weights(pretrained_model_name_or_path, subfolder, revision, kwargs)
        native = cls._native.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, dtype=dtype, revision=revision, **kwargs
        )
        return cls.from_native(native)

    @classmethod
    def _require_pytorch_weights(cls, path: Any, subfolder: str | None, revision: str | None, kwargs: dict) -> None:
        """FileNotFoundError naming ``from_pt`` where ``path`` holds no PyTorch-layout weights (only msgpack)."""
        names = ("variant", "local_files_only", "allow_pickle")
        options = {name: kwargs[name] for name in names if name in kwargs}
        try:
            cls._native.checkpoint_layout.locate(path, subfolder=subfolder, revision=revision, **options)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"from_pt=True: no PyTorch weights for {str(path)!r} (subfolder={subfolder!r}); pass from_pt=False "
                f"to read Flax *.msgpack weights. ({e})"
            ) from None

    def init_weights(self, rng: jax.Array) -> Any:
        """Fresh random params for this config, drawn from ``rng`` (a PRNG key)."""
        native = self._native.from_config(dict(self.config), rngs=nnx.Rngs(params=rng), dtype=self.dtype)
        return nnx.split(native)[1]

    def bind(self, params: Any) -> FlaxModelCompat:
        """A copy of this model with ``params`` merged in (what ``apply`` calls methods on)."""
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._bound = nnx.merge(self._graphdef, params)
        return bound

    def apply(self, variables: Mapping[str, Any], *args: Any, method: Callable | str | None = None, **kwargs: Any):
        """Call ``method`` (default ``__call__``; e.g. ``model.encode``) with ``variables["params"]`` merged in.

        ``rngs``, ``train`` and ``deterministic`` are accepted and unused (the networks have no dropout at inference).
        """
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables: expected {'params': params}, as 0.39's model.apply took")
        for unused in ("rngs", "train", "deterministic", "mutable"):
            kwargs.pop(unused, None)
        bound = self.bind(variables["params"])
        name = "__call__" if method is None else method if isinstance(method, str) else method.__name__
        return getattr(bound, name)(*args, **kwargs)

    def native(self) -> nnx.Module:
        """The native module this bound copy calls (only inside ``apply``)."""
        if self._bound is None:
            raise ValueError(
                f"params: {type(self).__name__} holds no weights; call model.apply({{'params': params}}, ...)"
            )
        return self._bound

    def save_pretrained(self, save_directory: str | os.PathLike, params: Any = None, **kwargs: Any):
        """Write ``config.json`` and PyTorch-layout safetensors for ``params`` (what both backends load)."""
        params = getattr(self, "params", None) if params is None else params
        if params is None:
            raise ValueError(
                "params: save_pretrained needs the params to write (save_pretrained(folder, params=params))"
            )
        return nnx.merge(self._graphdef, params).save_pretrained(save_directory, **kwargs)

    def to_bf16(self, params: Any, mask: Any = None) -> Any:
        return _cast_floats(params, jnp.bfloat16)

    def to_fp16(self, params: Any, mask: Any = None) -> Any:
        return _cast_floats(params, jnp.float16)

    def to_fp32(self, params: Any, mask: Any = None) -> Any:
        return _cast_floats(params, jnp.float32)


def _cast_floats(params: Any, dtype: Any) -> Any:
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, params)


class FlaxUNet2DConditionModel(FlaxModelCompat):
    """0.39's ``FlaxUNet2DConditionModel``: ``apply(..., sample, timesteps, encoder_hidden_states).sample``."""

    _native = models.UNet2DConditionModel

    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        added_cond_kwargs: Mapping[str, Any] | None = None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        return_dict: bool = True,
    ):
        if added_cond_kwargs:
            raise ValueError(
                "added_cond_kwargs: SDXL conditioning is not carried by the compat UNet; use the native API"
            )
        out = self.native()(
            sample,
            timesteps,
            encoder_hidden_states,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )
        return FlaxUNet2DConditionOutput(sample=out) if return_dict else (out,)


class FlaxControlNetModel(FlaxModelCompat):
    """0.39's ``FlaxControlNetModel``: ``apply(..., controlnet_cond, conditioning_scale)`` -> residuals."""

    _native = models.ControlNetModel

    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ):
        down, mid = self.native()(
            sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=conditioning_scale
        )
        if not return_dict:
            return tuple(down), mid
        return FlaxControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)


class FlaxAutoencoderKL(FlaxModelCompat):
    """0.39's ``FlaxAutoencoderKL``: ``encode(...).latent_dist`` (channels-last, as 0.39), ``decode(...).sample``."""

    _native = models.AutoencoderKL

    def encode(self, sample, deterministic: bool = True, return_dict: bool = True):
        posterior = self.native().encode(sample)  # NCHW moments
        dist = FlaxDiagonalGaussianDistribution(
            mean=_nhwc(posterior.mean), logvar=_nhwc(posterior.logvar), std=_nhwc(posterior.std)
        )
        return FlaxAutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, latents, deterministic: bool = True, return_dict: bool = True):
        if latents.shape[-1] == self.config["latent_channels"] and latents.shape[1] != self.config["latent_channels"]:
            latents = jnp.transpose(latents, (0, 3, 1, 2))  # 0.39 took channels-last latents too
        image = self.native().decode(latents)
        return FlaxDecoderOutput(sample=image) if return_dict else (image,)

    def __call__(self, sample, sample_posterior: bool = False, deterministic: bool = True, return_dict: bool = True):
        if sample_posterior:
            raise ValueError("sample_posterior: use encode(...).latent_dist.sample(key) then decode (needs a key)")
        dist = self.encode(sample).latent_dist
        return self.decode(jnp.transpose(dist.mode(), (0, 3, 1, 2)), return_dict=return_dict)


@flax.struct.dataclass
class FlaxBaseModelOutputWithPooling:
    """transformers' text-model output: fields by name, or by position (``out[0]``) as scripts indexed it."""

    last_hidden_state: jax.Array  # (B, T, hidden)
    pooler_output: jax.Array  # (B, hidden)
    hidden_states: tuple[jax.Array, ...] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states) if v is not None)

    def __getitem__(self, index: int) -> Any:
        return self.to_tuple()[index]


class FlaxCLIPTextModel(FlaxModelCompat):
    """transformers' ``FlaxCLIPTextModel``: ``model(input_ids, params=params)[0]``, or ``apply`` as the others.

    ``from_pretrained`` follows transformers: the model holding ``model.params``, or ``(model, params)``
    with ``_do_init=False`` (what diffusers' Flax pipelines asked for).
    """

    _native = models.CLIPTextModel
    params: Any = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, _do_init: bool = True, **kwargs: Any):
        model, params = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if not _do_init:
            return model, params
        model.params = params
        return model

    def __call__(
        self, input_ids, attention_mask=None, params: Any = None, output_hidden_states: bool = False, **_: Any
    ):
        if self._bound is None:  # transformers' Flax models took params as a call argument (or held them)
            params = self.params if params is None else params
            if params is None:
                raise ValueError("params: pass params=... (or load with _do_init=True, which keeps model.params)")
            return self.bind(params)(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        out = self.native()(jnp.asarray(input_ids), attention_mask, output_hidden_states=output_hidden_states)
        return FlaxBaseModelOutputWithPooling(out.last_hidden_state, out.pooler_output, out.hidden_states)
