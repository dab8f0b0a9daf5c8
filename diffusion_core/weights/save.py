"""Atomic saving of a state dict in diffusers' layout: safetensors shards, index, variants.

The new folder is built beside the target (other files of the target are hard-linked or
copied in, the old files of the same checkpoint are left out), then swapped in with one
rename by :func:`diffusion_core.atomic.atomic_folder` (which also removes what a killed save left).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from diffusion_core.atomic import atomic_folder
from diffusion_core.configuration import set_created_file_mode, write_json_atomic
from diffusion_core.weights.io import as_numpy
from diffusion_core.weights.layout import (
    DEFAULT_MAX_SHARD_SIZE,
    DIFFUSERS_WEIGHTS_NAME,
    add_variant,
    check_variant,
    check_weights_name,
    family_names,
    index_name,
    parse_size,
    shard_name,
)


def plan_shards(sizes: Mapping[str, int], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[list[str]]:
    """Split keys into shards greedily in key order, as diffusers/transformers do.

    A key that would push the open shard past ``max_shard_size`` closes it and starts a new one;
    a tensor larger than the limit gets a shard of its own, emitted at once (before the open
    shard), which is the order huggingface_hub's splitter gives, so the index matches byte for byte.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, size in sizes.items():
        if size > limit:
            shards.append([key])
            continue
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _write_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write one safetensors file and flush it to disk (tests replace this to simulate failures)."""
    save_file(tensors, str(path), metadata=metadata)
    set_created_file_mode(path)  # safetensors writes 0600
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _to_saveable(key: Any, value: Any) -> np.ndarray:
    if not isinstance(key, str) or not key:
        raise ValueError(f"state_dict keys must be non-empty strings, got {key!r}")
    array = as_numpy(value)
    if array.dtype.kind in "OUSMm" or array.dtype.name.startswith("void"):
        raise ValueError(f"state_dict[{key!r}] has dtype {array.dtype}, which safetensors cannot store")
    return np.ascontiguousarray(array)  # safetensors.numpy writes strided arrays in the wrong order


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(folder: Path, tmp: Path, drop: set[str]) -> None:
    """Put every entry of ``folder`` except ``drop`` into ``tmp`` (hard links where possible)."""
    for name in os.listdir(folder):
        if name in drop:
            continue
        src, dst = folder / name, tmp / name
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def _write_files(
    tmp: Path,
    arrays: dict[str, np.ndarray],
    weights_name: str,
    variant: str | None,
    shards: list[list[str]],
    meta: dict[str, str],
) -> list[str]:
    if len(shards) == 1:
        names = [add_variant(weights_name, variant)]
    else:
        names = [shard_name(weights_name, variant, i + 1, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        _write_shard(tmp / name, {k: arrays[k] for k in keys}, meta)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        names.append(index_name(weights_name, variant))
        write_json_atomic(tmp / names[-1], json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def save_state_dict(
    state_dict: Mapping[str, Any],
    folder: str | os.PathLike,
    *,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
    variant: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Save ``{key: array}`` into ``folder`` in diffusers' layout, atomically; return the written paths.

    Values may be numpy arrays (``ml_dtypes.bfloat16`` included), torch tensors (any device,
    bfloat16 included), jax arrays or anything with ``__array__``; dtypes are kept as given
    (a variant is only a name, as in diffusers). Files hold ``{"format": "pt"}`` metadata.
    Shards split greedily in key order at ``max_shard_size`` (an int, or ``"5GB"``, ``"10KB"``).
    Other files in ``folder`` (``config.json``, other variants) are kept; the previous files of
    this checkpoint (single file, shards, index) are replaced as a whole.
    """
    check_weights_name(weights_name)
    check_variant(variant)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"state_dict must be a non-empty mapping of key -> array, got {type(state_dict).__name__}")
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
    arrays = {k: _to_saveable(k, v) for k, v in state_dict.items()}
    shards = plan_shards({k: a.nbytes for k, a in arrays.items()}, max_shard_size)
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder must be a directory path, got the file {str(folder)!r}")
    with atomic_folder(folder) as tmp:
        if folder.is_dir():
            shutil.copymode(folder, tmp)
            _carry_over(folder, tmp, set(family_names(folder, weights_name, variant)))
        names = _write_files(tmp, arrays, weights_name, variant, shards, meta)
    return [folder / name for name in names]
