"""The Flax half of LoRA: a layer's stacked low-rank pair as variables of its ``nnx.Linear`` / ``nnx.Conv``.

The bookkeeping (files, adapters, weights, fusing) is ``diffusion_core.pipelines.lora``. A layer that carries
adapters becomes a :class:`LoraLinear` / :class:`LoraConv` (the same object, its class switched to the subclass,
so every parameter path stays the diffusers one) holding ``lora_down``, ``lora_up`` and ``lora_scales`` as
:class:`LoraWeight` variables. They are part of the module's state, so ``nnx.split`` hands them to the compiled
denoising program as inputs: new adapter weights are new values, never a new program. Checkpoint loading and
saving read ``nnx.Param`` / ``FrozenWeight`` only, so a model with adapters still saves as its base.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax.models.modeling import torch_shapes
from diffusion_core.pipelines.lora import LoraLoaderMixin, LoraPack
from diffusion_core.weights.convert import FlaxPath, match_flax_path

_LORA_VARIABLES = ("lora_down", "lora_up", "lora_scales", "lora_conv")
_CONV_DOWN = ("lora_conv", "kernel")  # a LoraConv's down factor


class LoraWeight(nnx.Variable):
    """A LoRA factor or column scale: an input of compiled programs, not a checkpoint parameter."""


class LoraLinear(nnx.Linear):
    """``nnx.Linear`` plus ``((x @ lora_down) * lora_scales) @ lora_up``; down (in, R), up (R, out), scales (R,)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        h = (inputs.astype(self.lora_down.dtype) @ self.lora_down[...]) * self.lora_scales[...]  # (..., R)
        return y + (h @ self.lora_up[...]).astype(y.dtype)


class LoraConv(nnx.Conv):
    """``nnx.Conv`` plus ``lora_up`` (R, out) over ``lora_scales * lora_conv(x)``; ``lora_conv`` has the layer's
    geometry and the down kernel (kh, kw, in, R)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        h = self.lora_conv(inputs.astype(self.lora_up.dtype)) * self.lora_scales[...]  # (B, H', W', R)
        return y + (h @ self.lora_up[...]).astype(y.dtype)


_LORA_CLASSES = {nnx.Linear: LoraLinear, nnx.Conv: LoraConv}


def _is_target(node: object) -> bool:
    """A Linear or 2-d Conv (one group) whose kernel is a checkpoint parameter (not a LoRA layer's own conv)."""
    if type(node) in (nnx.Linear, LoraLinear):
        return isinstance(node.kernel, nnx.Param)
    if type(node) in (nnx.Conv, LoraConv):
        return isinstance(node.kernel, nnx.Param) and len(node.kernel.shape) == 4 and node.feature_group_count == 1
    return False


def _key(path: FlaxPath) -> str:
    return ".".join(str(p) for p in path)


def _flax_array(array: np.ndarray, dtype) -> jax.Array:
    """A PyTorch-layout weight (or delta) in the Flax layout, by the converter's rule."""
    _, rule = match_flax_path(("kernel",), array.ndim)
    return jnp.asarray(rule.flax_array(np.asarray(array)), dtype)


def lora_targets(model: nnx.Module) -> dict[str, nnx.Module]:
    """``{module path: layer}`` of every Linear and 2-d Conv (one group) of ``model``."""
    return {_key(path): node for path, node in nnx.iter_graph(model) if _is_target(node)}


def _attach(layer: nnx.Module, pack: LoraPack) -> None:
    dtype = layer.kernel.dtype
    if isinstance(layer, nnx.Conv):
        layer.__class__ = LoraConv
        rank = pack.down.shape[0]
        conv = nnx.Conv(
            layer.in_features, rank, layer.kernel_size, layer.strides, padding=layer.padding,
            input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation, use_bias=False,
            dtype=layer.dtype, param_dtype=dtype, precision=layer.precision, rngs=nnx.Rngs(0),
        )  # fmt: skip
        conv.kernel = LoraWeight(_flax_array(pack.down, dtype))  # (kh, kw, in, R)
        layer.lora_conv = conv
        layer.lora_up = LoraWeight(_flax_array(pack.up[:, :, 0, 0], dtype))  # (R, out)
    else:
        layer.__class__ = LoraLinear
        layer.lora_down = LoraWeight(_flax_array(pack.down, dtype))  # (in, R)
        layer.lora_up = LoraWeight(_flax_array(pack.up, dtype))  # (R, out)
    layer.lora_scales = LoraWeight(jnp.asarray(pack.scales, dtype))  # (R,)


def _detach(layer: nnx.Module) -> None:
    for name in _LORA_VARIABLES:
        if name in vars(layer):
            delattr(layer, name)
    layer.__class__ = nnx.Conv if isinstance(layer, nnx.Conv) else nnx.Linear


def install(model: nnx.Module, packs: Mapping[str, LoraPack]) -> None:
    """Make exactly the layers in ``packs`` carry them (the others back to plain Linear / Conv)."""
    layers = lora_targets(model)
    unknown = sorted(set(packs) - set(layers))
    if unknown:
        raise ValueError(f"packs: no Linear/Conv layer at {unknown}")
    for layer in layers.values():
        if type(layer) in _LORA_CLASSES.values():
            _detach(layer)
    for path, pack in packs.items():
        _attach(layers[path], pack)


def is_lora_factor(path: tuple, value: object) -> bool:
    """nnx filter: the down / up factors of the LoRA layers (what LoRA training updates), not their column scales."""
    return isinstance(value, LoraWeight) and (path[-1] in ("lora_down", "lora_up") or tuple(path[-2:]) == _CONV_DOWN)


def _torch_array(array: jax.Array) -> np.ndarray:
    """A Flax-layout factor in the PyTorch layout, by the converter's (inverse) rule."""
    _, rule = match_flax_path(("kernel",), array.ndim)
    return rule.torch_array(np.asarray(array, np.float32))


def lora_factors(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer path: (down, up)}`` of the layers carrying adapters, PyTorch layout (see ``LoraPack``)."""
    out = {}
    for path, layer in lora_targets(model).items():
        if isinstance(layer, LoraConv):
            up = _torch_array(layer.lora_up[...])[:, :, None, None]  # (out, R, 1, 1)
            out[path] = (_torch_array(layer.lora_conv.kernel[...]), up)  # down (R, in, kh, kw)
        elif isinstance(layer, LoraLinear):
            out[path] = (_torch_array(layer.lora_down[...]), _torch_array(layer.lora_up[...]))  # (R, in), (out, R)
    return out


class FlaxLoraLayers(LoraLoaderMixin):
    """The Flax hooks of ``LoraLoaderMixin``."""

    def _lora_targets(self, component: str) -> dict[str, tuple[int, ...]]:
        model = getattr(self, component)
        shapes = torch_shapes(model)  # {PyTorch key: PyTorch shape}, by the converter's rules
        return {path: shapes[f"{path}.weight"] for path in lora_targets(model)}

    def _lora_install(self, component: str, packs: Mapping[str, LoraPack]) -> None:
        install(getattr(self, component), packs)

    def _lora_set_scales(self, component: str, scales: Mapping[str, np.ndarray]) -> None:
        layers = lora_targets(getattr(self, component))
        for path, values in scales.items():
            variable = layers[path].lora_scales
            variable[...] = jnp.asarray(values, variable.dtype)

    def _lora_add_weights(self, component: str, deltas: Mapping[str, np.ndarray]) -> None:
        layers = lora_targets(getattr(self, component))
        for path, delta in deltas.items():
            kernel = layers[path].kernel
            kernel[...] = kernel[...] + _flax_array(delta, kernel.dtype)
