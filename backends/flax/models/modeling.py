"""``from_pretrained``/``save_pretrained`` for Flax NNX models in diffusers' or transformers' (PyTorch) layout.

The model is built abstractly with ``nnx.eval_shape`` (no weight memory); its non-weight state
(dropout RNG streams) is then made concrete. The checkpoint is streamed through
``load_torch_state_dict``, which checks every key and shape before anything is assigned.
Saving goes back through ``flax_state_to_torch``. Which layout a class reads and writes is its
``checkpoint_layout`` (diffusers' by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from backends.flax.models.loading import WEIGHTS, flax_state_to_torch, load_torch_state_dict
from diffusion_core.weights import DEFAULT_MAX_SHARD_SIZE, iter_tensors, save_state_dict
from diffusion_core.weights.pretrained import DIFFUSERS_LAYOUT, CheckpointLayout

M = TypeVar("M", bound="PretrainedMixin")


def _concrete(index: int, leaf: Any) -> Any:
    """A concrete value for an abstract non-weight leaf: a distinct RNG key, or zeros (counters)."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        key = jax.random.fold_in(jax.random.key(0), index)
        return jax.random.split(key, leaf.shape) if leaf.shape else key
    return jnp.zeros(leaf.shape, leaf.dtype)


def _abstract_model(cls: type, config: dict[str, Any], dtype: Any) -> nnx.Module:
    """``cls.from_config(config, dtype=dtype)`` with abstract weights and concrete other state.

    Non-weight state (dropout RNG streams) gets fresh keys, one per stream, derived from seed 0.
    """
    model = nnx.eval_shape(lambda: cls.from_config(config, dtype=dtype))
    rest = nnx.state(model, nnx.Not(WEIGHTS))
    leaves, treedef = jax.tree_util.tree_flatten(rest)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, [_concrete(i, v) for i, v in enumerate(leaves)]))
    return model


class PretrainedMixin:
    """Adds diffusers/transformers-compatible ``from_pretrained``/``save_pretrained`` to an NNX module."""

    config: dict[str, Any]
    checkpoint_layout: ClassVar[CheckpointLayout] = DIFFUSERS_LAYOUT

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
    ) -> M:
        """Load a diffusers/transformers (PyTorch-layout) checkpoint from a folder or a Hub repo id.

        Weights are cast to ``dtype``. ``.bin`` (pickle) weights are read only with ``allow_pickle=True``
        (through ``torch.load(weights_only=True)``). Raises ValueError listing unmatched/missing/
        mis-shaped keys, FileNotFoundError when files are absent.
        """
        layout = cls.checkpoint_layout
        found = layout.locate(
            path_or_repo_id,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
        )
        model = _abstract_model(cls, found.config, dtype)
        load_torch_state_dict(model, layout.rename(iter_tensors(found.files)))
        return model

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
