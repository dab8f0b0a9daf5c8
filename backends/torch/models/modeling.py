"""``from_pretrained``/``save_pretrained`` for PyTorch models in diffusers' folder layout.

The model is built on the meta device (no memory), the checkpoint's keys and shapes are checked
strictly against it from the file headers, and only then are tensors streamed in (cast on the
way) and assigned, so no model ever holds random weights and two full copies never exist.
(transformers-layout CLIP models are not covered yet.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffusion_core.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    check_keys,
    iter_tensors,
    resolve_weight_files,
    save_state_dict,
    tensor_infos,
)
from diffusion_core.weights.pretrained import load_model_config, resolve_pretrained_folder, save_model_config

M = TypeVar("M", bound="PretrainedMixin")


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return str(torch.get_default_dtype()).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


class PretrainedMixin:
    """Adds diffusers-compatible ``from_pretrained``/``save_pretrained`` to a module with ``from_config``."""

    config: dict[str, Any]

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> M:
        """Load a model saved by diffusers (or ``save_pretrained``) from a folder or a Hub repo id.

        Floating weights are cast to ``dtype`` (default: torch's default dtype). Raises ValueError
        listing missing/unexpected/mis-shaped keys, FileNotFoundError when files are absent.
        """
        target = _dtype_name(dtype)
        folder = resolve_pretrained_folder(
            path_or_repo_id,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
        )
        config = load_model_config(folder)
        files = resolve_weight_files(folder, variant=variant)
        found = tensor_infos(files)  # validates shard indexes; headers only
        with torch.device("meta"):
            model = cls.from_config(config)  # type: ignore[attr-defined]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, found, name=f"checkpoint {str(folder)!r}")
        state = dict(iter_tensors(files, framework="pt", dtype=target, validate=False))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        variant: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> list[Path]:
        """Write ``config.json`` and the weights (sharded past ``max_shard_size``) as diffusers does."""
        state: Mapping[str, torch.Tensor] = self.state_dict()  # type: ignore[attr-defined]
        paths = save_state_dict(
            {k: v.detach() for k, v in state.items()}, folder, variant=variant, max_shard_size=max_shard_size
        )
        return [*paths, save_model_config(self.config, folder, type(self).__name__)]
