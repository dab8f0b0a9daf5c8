"""Fill a Flax NNX model from a diffusers/PyTorch state dict and back, through the one converter.

Only parameters take part (``nnx.Param`` and ``FrozenWeight``); RNG streams of dropout layers
are not weights. Loading is strict and all-or-nothing: on any unmatched, missing, unexpected
or mis-shaped key the ValueError is raised before the model is touched. ``load_checkpoint`` is
the fast form for a checkpoint whose shapes are known from its header: the keys are matched before
any tensor is read, then each tensor is read, converted and cast in one aligned host copy that the
device adopts, on several threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax.models import weight_cache
from diffusion_core.flax.models.layers import FrozenWeight
from diffusion_core.weights import as_numpy
from diffusion_core.weights.convert import (
    FlaxPath,
    Rule,
    flax_to_torch,
    path_to_key,
    torch_to_flax,
    torch_to_flax_plan,
)
from diffusion_core.weights.pretrained import CheckpointSource

WEIGHTS = (nnx.Param, FrozenWeight)  # the variable kinds a checkpoint holds


def weight_shapes(model: nnx.Module) -> dict[FlaxPath, tuple[int, ...]]:
    """``{path: shape}`` of every weight of ``model`` (the converter's target tree)."""
    return {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def _items(state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, np.ndarray]]:
    pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    for key, value in pairs:
        yield key, as_numpy(value)


def _on_device(array: np.ndarray, dtype: Any, fresh: bool) -> jax.Array:
    """``array`` as a jax array of ``dtype``, independent of the caller's memory.

    A ``fresh`` array (the converter's own copy) is adopted by XLA:CPU without a copy (``may_alias``); any other
    is first copied on the host, since XLA may read a host buffer after the call returns and the caller (or a
    reading buffer that the next tensor overwrites) may change it.
    """
    if not fresh:
        array = np.array(array, copy=True)
    if array.dtype == dtype:
        return jax.device_put(array, may_alias=True)
    return jnp.array(array, dtype=dtype, copy=True)


def load_torch_state_dict(model: nnx.Module, state_dict_items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
    """Copy a diffusers state dict (mapping or ``(key, tensor)`` stream) into ``model``, strictly.

    Tensors are converted one at a time (layout changes by ``transpose_copy``) and cast to each
    parameter's dtype; nothing is assigned unless every tensor converted.
    """
    state = nnx.state(model, WEIGHTS)
    variables = dict(nnx.to_flat_state(state))
    target = {tuple(path): tuple(var.shape) for path, var in variables.items()}
    last_input: list[np.ndarray] = []  # the tensor being converted, to tell the converter's copies from inputs

    def inputs() -> Iterator[tuple[str, np.ndarray]]:
        for key, array in _items(state_dict_items):
            last_input[:] = [array]
            yield key, array

    new_values = {}
    for path, array in torch_to_flax(inputs(), target):
        fresh = not np.may_share_memory(array, last_input[0])
        new_values[path] = _on_device(array, variables[path].dtype, fresh)
    for path, value in new_values.items():  # reached only when the converter found no problem
        variables[path].set_value(value)
    nnx.update(model, state)


def load_checkpoint(model: nnx.Module, source: CheckpointSource, workers: int = 1, cache: Path | None = None) -> None:
    """Fill ``model`` from ``source`` strictly, reading and converting tensors on ``workers`` threads.

    The checkpoint's keys and shapes (``source.infos``) are matched against the model first, with
    :func:`load_torch_state_dict`'s ValueError. Each tensor is then copied once, from the file's memory map into
    a new aligned host array in its parameter's layout and dtype, which the device adopts (no second copy on
    CPU; one transfer elsewhere). ``cache``: where the weight cache (``weight_cache``) keeps this checkpoint: the
    entry there is used, with no copy at all, when it holds exactly these converted tensors, and is otherwise
    written from them. Nothing is assigned unless every tensor converted.
    """
    state = nnx.state(model, WEIGHTS)
    variables = dict(nnx.to_flat_state(state))
    target = {tuple(path): tuple(var.shape) for path, var in variables.items()}
    plan = torch_to_flax_plan({key: shape for key, (_, shape) in source.infos.items()}, target)
    dtypes = {key: np.dtype(variables[path].dtype) for key, (path, _) in plan.items()}
    layout = {
        key: (path_to_key(path), rule.flax_axes(len(target[path])), dtypes[key].name, target[path])
        for key, (path, rule) in plan.items()
    }
    hosts = None if cache is None else weight_cache.read_entry(cache, layout)
    if hosts is None:
        hosts = _converted(source, plan, dtypes, workers)
        if cache is not None:
            hosts = weight_cache.write_entry(cache, hosts, layout)
    # placed from this thread: jax's default device (``jax.default_device``) is a per-thread setting
    new_values = {plan[key][0]: jax.device_put(host, may_alias=True) for key, host in hosts.items()}
    for path, value in new_values.items():
        variables[path].set_value(value)
    nnx.update(model, state)


def _converted(
    source: CheckpointSource, plan: dict[str, tuple[FlaxPath, Rule]], dtypes: dict[str, np.dtype], workers: int
) -> dict[str, np.ndarray]:
    """``{key: new aligned host copy in the Flax layout and dtype}`` for every tensor of ``plan``."""

    def convert(key: str, array: np.ndarray) -> np.ndarray:
        if key not in plan:
            raise ValueError(f"{source.name}: tensor {key!r} is not among the keys its header lists")
        return plan[key][1].flax_copy(array, dtypes[key])

    hosts = dict(source.tensors("numpy", None, convert, workers))
    if len(hosts) != len(plan):
        raise ValueError(f"{source.name}: {len(plan) - len(hosts)} tensors its header lists were not read")
    return hosts


def flax_state_to_torch(model: nnx.Module) -> dict[str, np.ndarray]:
    """The diffusers/PyTorch state dict of ``model`` as numpy arrays (PyTorch layouts)."""
    leaves = ((tuple(path), np.asarray(var.get_value())) for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS)))
    return dict(flax_to_torch(leaves))
