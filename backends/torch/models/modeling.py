"""``from_pretrained``/``from_single_file``/``save_pretrained`` for PyTorch models (diffusers/transformers layouts).

Both loaders go through one path (``_from_source``): the model is built on the meta device (no
memory), the checkpoint's keys and shapes, read from the file headers, are checked strictly
against it, and only then are tensors streamed in (cast on the way) and assigned, so no model
ever holds random weights and two full copies never exist. Which layout a class reads and
writes is its ``checkpoint_layout`` (diffusers' by default); which part of a CompVis single file
it reads is its ``single_file_component``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffusion_core.configuration import FrozenConfig
from diffusion_core.weights import DEFAULT_MAX_SHARD_SIZE, check_keys, save_state_dict
from diffusion_core.weights.pretrained import CheckpointModel, CheckpointSource

M = TypeVar("M", bound="PretrainedMixin")


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return str(torch.get_default_dtype()).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


class PretrainedMixin(CheckpointModel):
    """Adds ``from_pretrained``/``from_single_file``/``save_pretrained`` to a module with ``from_config``."""

    config: FrozenConfig

    @classmethod
    def _from_source(cls: type[M], source: CheckpointSource, dtype: torch.dtype | None) -> M:
        """Build on meta, check ``source.infos`` strictly, then stream the tensors in (cast to ``dtype``)."""
        target = _dtype_name(dtype)
        with torch.device("meta"):
            model = cls.from_config(source.config)  # type: ignore[attr-defined]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, source.infos, name=source.name)
        model.load_state_dict(dict(cls._cast_tensors(source, target)), strict=True, assign=True)
        return model.eval()

    @classmethod
    def _cast_tensors(cls, source: CheckpointSource, target: str) -> Iterator[tuple[str, torch.Tensor]]:
        """``source``'s tensors cast to ``target``, except those the layout keeps float32 (T5's ``wo`` in float16)."""
        layout = cls.checkpoint_layout
        if all(layout.weight_dtype(key, target) == target for key in source.infos):
            yield from source.tensors("pt", target)
            return
        for key, tensor in source.tensors("pt", None):
            dtype = getattr(torch, layout.weight_dtype(key, target))
            yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor

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
        check_finite: bool = False,
    ) -> M:
        """Load a model saved by diffusers/transformers (or ``save_pretrained``) from a folder or a Hub repo id.

        Floating weights are cast to ``dtype`` (default: torch's default dtype). ``.bin`` (pickle)
        weights are read only with ``allow_pickle=True`` (and then with ``torch.load(weights_only=True)``).
        Raises ValueError listing missing/unexpected/mis-shaped keys, FileNotFoundError when files are absent.
        """
        _dtype_name(dtype)  # bad dtypes fail before any download
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
        dtype: torch.dtype | None = None,
        extract_ema: bool = False,
        allow_pickle: bool = False,
    ) -> M:
        """Load this model's part of an original CompVis / SD 1.x-2.x or SGM SDXL single-file checkpoint.

        ``config``: the model's config as a dict, a ``config.json``, or a folder holding one
        (``subfolder`` inside it, e.g. a diffusers pipeline folder and ``"unet"``). SD 2.x OpenCLIP
        text towers load into ``CLIPTextModel`` (the caller's config gives its size); SDXL's CLIP-L into
        ``CLIPTextModel``, its OpenCLIP bigG (base or refiner) into ``CLIPTextModelWithProjection``. ``extract_ema``
        reads the UNet's EMA copy; ``.ckpt`` files need ``allow_pickle=True``. Raises ValueError
        listing missing/unexpected/mis-shaped keys before any weight is read.
        """
        _dtype_name(dtype)
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
