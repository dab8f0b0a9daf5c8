"""``from_pretrained``/``from_single_file``/``save_pretrained`` for Flax NNX models (PyTorch-layout checkpoints).

Both loaders go through one path (``_from_source``): the model is built abstractly with
``nnx.eval_shape`` (no weight memory) and its non-weight state (dropout RNG streams) made
concrete, once per (class, config, dtype) in a process: later loads merge a fresh module from the
cached graph and abstract state; the checkpoint's keys and shapes, read from the file headers, are
checked strictly against the model's PyTorch names and shapes; then the tensors are read and converted
on several threads by ``load_checkpoint``, which assigns nothing unless every tensor converted (or, with the
weight cache on, maps the converted copy an earlier load left in it: ``weight_cache``). Saving goes back
through ``flax_state_to_torch``. Which layout a class reads and writes is its ``checkpoint_layout``
(diffusers' by default); which part of a CompVis single file it reads is its ``single_file_component``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models import weight_cache
from diffusion_core.flax.models.layers import shape_only_init
from diffusion_core.flax.models.loading import WEIGHTS, flax_state_to_torch, load_checkpoint, weight_shapes
from diffusion_core.weights import DEFAULT_MAX_SHARD_SIZE, check_keys, save_state_dict
from diffusion_core.weights.convert import match_flax_path, path_to_key
from diffusion_core.weights.io import default_workers
from diffusion_core.weights.pretrained import CheckpointModel, CheckpointSource

M = TypeVar("M", bound="PretrainedMixin")


def _concrete(index: int, leaf: Any) -> Any:
    """A concrete value for an abstract non-weight leaf: a distinct RNG key, or zeros (counters)."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        key = jax.random.fold_in(jax.random.key(0), index)
        return jax.random.split(key, leaf.shape) if leaf.shape else key
    return jnp.zeros(leaf.shape, leaf.dtype)


def _build_abstract(cls: type, config: dict[str, Any], dtype: Any) -> nnx.Module:
    """``cls.from_config(config, dtype=dtype)`` with abstract weights and concrete other state.

    Non-weight state (dropout RNG streams) gets fresh keys, one per stream, derived from seed 0.
    """
    with shape_only_init():  # the weights are abstract: no random initialiser worth tracing
        model = nnx.eval_shape(lambda: cls.from_config(config, dtype=dtype))
    rest = nnx.state(model, nnx.Not(WEIGHTS))
    leaves, treedef = jax.tree_util.tree_flatten(rest)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, [_concrete(i, v) for i, v in enumerate(leaves)]))
    return model


@functools.lru_cache(maxsize=16)
def _abstract_parts(cls: type, config_json: str, dtype_name: str) -> tuple[Any, Any]:
    """The graph and state of :func:`_build_abstract`'s model, built once per (class, config, dtype).

    Shape-only and immutable (``ShapeDtypeStruct`` weights, jax-array RNG keys): a module merged from them
    shares no mutable state with another one.
    """
    return nnx.split(_build_abstract(cls, json.loads(config_json), jnp.dtype(dtype_name)))


def _abstract_model(cls: type, config: dict[str, Any], dtype: Any) -> nnx.Module:
    """A new abstract ``cls`` for ``config`` and ``dtype`` (``nnx.eval_shape`` costs ~2 s for SD's UNet: it is done
    once per process and configuration; a config that is not plain JSON is built afresh each time)."""
    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError:
        return _build_abstract(cls, config, dtype)
    graph, state = _abstract_parts(cls, config_json, jnp.dtype(dtype).name)
    return nnx.merge(graph, state, copy=True)


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{PyTorch key: PyTorch shape}`` of every weight of ``model``, from shapes only (no array is built)."""
    shapes, unmatched = {}, []
    for path, shape in weight_shapes(model).items():
        match = match_flax_path(path, len(shape))
        if match is None:
            unmatched.append(path_to_key(path))
            continue
        key, rule = match
        order = range(len(shape)) if rule.to_flax is None else sorted(range(len(shape)), key=rule.to_flax.__getitem__)
        shapes[key] = tuple(shape[i] for i in order)  # the inverse of the torch->flax transpose
    if unmatched:
        raise ValueError(f"{type(model).__name__}: weights with no PyTorch name: {sorted(unmatched)}")
    return shapes


class PretrainedMixin(CheckpointModel):
    """Adds ``from_pretrained``/``from_single_file``/``save_pretrained`` (PyTorch-layout files) to an NNX module."""

    config: FrozenConfig

    @classmethod
    def _from_source(cls: type[M], source: CheckpointSource, dtype: Any) -> M:
        """Build abstractly, check ``source.infos`` strictly, then stream the tensors in (cast to ``dtype``)."""
        model = _abstract_model(cls, source.config, dtype)
        check_keys(torch_shapes(model), source.infos, name=source.name)
        load_checkpoint(model, source, default_workers(), weight_cache.entry_path(cls, source.files, dtype))
        return model

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        allow_pickle: bool = False,
        check_finite: bool = False,
    ) -> M:
        """Load a diffusers/transformers (PyTorch-layout) checkpoint from a folder or a Hub repo id.

        Weights are cast to ``dtype``. ``.bin`` (pickle) weights are read only with ``allow_pickle=True``
        (through ``torch.load(weights_only=True)``). Raises ValueError listing unmatched/missing/
        mis-shaped keys, FileNotFoundError when files are absent. Safetensors weights are read and converted
        on one thread per core this process may run on (at most 8); the abstract model of a (class, config,
        dtype) is built once per process.
        """
        source = cls.pretrained_source(
            path_or_repo_id,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
            check_finite=check_finite,
        )
        return cls._from_source(source, dtype)

    @classmethod
    def from_single_file(
        cls: type[M],
        path: str | os.PathLike,
        config: Mapping[str, Any] | str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        extract_ema: bool = False,
        allow_pickle: bool = False,
    ) -> M:
        """Load this model's part of an original CompVis / SD 1.x-2.x or SGM SDXL single-file checkpoint.

        ``config``: the model's config as a dict, a ``config.json``, or a folder holding one
        (``subfolder`` inside it, e.g. a diffusers pipeline folder and ``"unet"``). SD 2.x OpenCLIP
        text towers load into ``CLIPTextModel`` (the caller's config gives its size); SDXL's CLIP-L into
        ``CLIPTextModel``, its OpenCLIP bigG (base or refiner) into ``CLIPTextModelWithProjection``. Weights are cast
        to ``dtype``; ``extract_ema`` reads the UNet's EMA copy; ``.ckpt`` files need ``allow_pickle=True``.
        Raises ValueError listing missing/unexpected/mis-shaped keys before any weight is read.
        """
        source = cls.single_file_source(
            path, config, subfolder=subfolder, extract_ema=extract_ema, allow_pickle=allow_pickle
        )
        return cls._from_source(source, dtype)

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        variant: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> list[Path]:
        """Write ``config.json`` and PyTorch-layout weights (sharded past ``max_shard_size``) in the class's layout."""
        state = flax_state_to_torch(self)  # type: ignore[arg-type]
        layout = self.checkpoint_layout
        paths = save_state_dict(
            state, folder, weights_name=layout.weights_name, variant=variant, max_shard_size=max_shard_size
        )
        dtype_name = next(iter(state.values())).dtype.name
        return [*paths, layout.save_config(self.config, folder, type(self).__name__, dtype_name)]
