"""``from_pretrained``/``save_pretrained`` for PyTorch models in diffusers' or transformers' folder layout.

The model is built on the meta device (no memory), the checkpoint's keys and shapes are checked
strictly against it from the file headers, and only then are tensors streamed in (cast on the
way) and assigned, so no model ever holds random weights and two full copies never exist.
Which layout a class reads and writes is its ``checkpoint_layout`` (diffusers' by default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from diffusion_core.weights import DEFAULT_MAX_SHARD_SIZE, check_keys, iter_tensors, save_state_dict, tensor_infos
from diffusion_core.weights.pretrained import DIFFUSERS_LAYOUT, CheckpointLayout

M = TypeVar("M", bound="PretrainedMixin")


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return str(torch.get_default_dtype()).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


class PretrainedMixin:
    """Adds diffusers/transformers-style ``from_pretrained``/``save_pretrained`` to a module with ``from_config``."""

    config: dict[str, Any]
    checkpoint_layout: ClassVar[CheckpointLayout] = DIFFUSERS_LAYOUT

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        allow_pickle: bool = False,
    ) -> M:
        """Load a model saved by diffusers/transformers (or ``save_pretrained``) from a folder or a Hub repo id.

        Floating weights are cast to ``dtype`` (default: torch's default dtype). ``.bin`` (pickle)
        weights are read only with ``allow_pickle=True`` (and then with ``torch.load(weights_only=True)``).
        Raises ValueError listing missing/unexpected/mis-shaped keys, FileNotFoundError when files are absent.
        """
        target = _dtype_name(dtype)
        layout = cls.checkpoint_layout
        found = layout.locate(
            path_or_repo_id,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
        )
        infos = dict(layout.rename(tensor_infos(found.files).items()))  # validates shard indexes; headers only
        with torch.device("meta"):
            model = cls.from_config(found.config)  # type: ignore[attr-defined]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, infos, name=f"checkpoint {str(found.folder)!r}")
        tensors = iter_tensors(found.files, framework="pt", dtype=target, validate=False)
        model.load_state_dict(dict(layout.rename(tensors)), strict=True, assign=True)
        return model.eval()

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        variant: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> list[Path]:
        """Write ``config.json`` and the weights (sharded past ``max_shard_size``) as diffusers/transformers do."""
        state: Mapping[str, torch.Tensor] = self.state_dict()  # type: ignore[attr-defined]
        layout = self.checkpoint_layout
        paths = save_state_dict(
            {k: v.detach() for k, v in state.items()},
            folder,
            weights_name=layout.weights_name,
            variant=variant,
            max_shard_size=max_shard_size,
        )
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        return [*paths, layout.save_config(self.config, folder, type(self).__name__, dtype_name)]
