"""Weight file names in diffusers' folder layout, and finding the files of one checkpoint.

A checkpoint in a model folder is either one file (``diffusion_pytorch_model.safetensors``)
or shards (``diffusion_pytorch_model-00001-of-00003.safetensors``, ...) listed by an index
(``diffusion_pytorch_model.safetensors.index.json``). A variant puts its name before the
extension (``diffusion_pytorch_model.fp16.safetensors``, shards
``diffusion_pytorch_model.fp16-00001-of-00003.safetensors``, index
``diffusion_pytorch_model.safetensors.index.fp16.json``), exactly as diffusers 0.42 writes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# The pickle file that goes with each safetensors name (transformers' differs in its stem).
_PICKLE_NAMES = {DIFFUSERS_WEIGHTS_NAME: "diffusion_pytorch_model.bin", TRANSFORMERS_WEIGHTS_NAME: "pytorch_model.bin"}
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_VARIANT_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class WeightFiles:
    """The files of one checkpoint: ``files`` in reading order; ``weight_map`` only when sharded."""

    folder: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None = None
    index_file: Path | None = None
    is_pickle: bool = False


def check_variant(variant: str | None) -> str | None:
    """Return ``variant`` if it is None or a plain name such as ``"fp16"``; raise ValueError otherwise."""
    if variant is not None and (not isinstance(variant, str) or not _VARIANT_RE.fullmatch(variant)):
        raise ValueError(
            f"variant must be None or a name of letters, digits, '_' or '-' (e.g. 'fp16'), got {variant!r}"
        )
    return variant


def check_weights_name(weights_name: str) -> str:
    """Return ``weights_name`` if it is a plain ``*.safetensors`` file name; raise ValueError otherwise."""
    if (
        not isinstance(weights_name, str)
        or not weights_name.endswith(".safetensors")
        or Path(weights_name).name != weights_name
        or weights_name == ".safetensors"
    ):
        raise ValueError(
            f"weights_name must be a file name ending in '.safetensors' such as {DIFFUSERS_WEIGHTS_NAME!r} "
            f"or {TRANSFORMERS_WEIGHTS_NAME!r}, got {weights_name!r}"
        )
    return weights_name


def pickle_weights_name(weights_name: str) -> str:
    """The pickle file that stands for a safetensors name (``model.safetensors`` -> ``pytorch_model.bin``)."""
    return _PICKLE_NAMES.get(weights_name, weights_name[: -len(".safetensors")] + ".bin")


def add_variant(name: str, variant: str | None) -> str:
    """Put ``variant`` before the last extension: ``a.safetensors`` -> ``a.fp16.safetensors``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def index_name(weights_name: str, variant: str | None = None) -> str:
    """The shard index name: ``<weights_name>.index.json``, with the variant before ``.json``."""
    return add_variant(f"{weights_name}.index.json", variant)


def shard_name(weights_name: str, variant: str | None, number: int, count: int) -> str:
    """The name of shard ``number`` (1-based) of ``count``: ``stem[.variant]-0000K-of-0000N.safetensors``."""
    stem, ext = add_variant(weights_name, variant).rsplit(".", 1)
    return f"{stem}-{number:05d}-of-{count:05d}.{ext}"


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Bytes from an int or a string like ``"5GB"``/``"10KB"`` (powers of 1000) or ``"2GiB"`` (powers of 1024)."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be a positive int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", size)
        unit = match.group(2).upper() if match else ""
        if unit not in _SIZE_UNITS:
            raise ValueError(f"{name} must be an int or a number with a unit {sorted(_SIZE_UNITS)}, got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"{name} must be a positive int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return value


def family_names(folder: str | os.PathLike, weights_name: str, variant: str | None) -> list[str]:
    """Names in ``folder`` that belong to the (weights_name, variant) checkpoint: file, shards and index."""
    stem, ext = add_variant(weights_name, variant).rsplit(".", 1)
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\." + re.escape(ext))
    own = {add_variant(weights_name, variant), index_name(weights_name, variant)}
    if not Path(folder).is_dir():
        return []
    return sorted(n for n in os.listdir(folder) if n in own or shard.fullmatch(n))


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: a JSON object mapping keys to plain file names."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"shard index {str(path)!r} is not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"shard index {str(path)!r} must hold a non-empty 'weight_map' object {{key: file name}}")
    bad = sorted(
        f"{k!r}: {v!r}"
        for k, v in weight_map.items()
        if not isinstance(v, str) or Path(v).name != v or v in ("", ".", "..") or "\\" in v
    )
    if bad:
        raise ValueError(f"shard index {str(path)!r} names files outside its folder or non-strings: {bad[:10]}")
    return weight_map


def resolve_weight_files(
    folder: str | os.PathLike,
    *,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> WeightFiles:
    """Find the checkpoint files in ``folder`` as diffusers does: the shard index first, then the single file.

    ``.bin`` (pickle) files are used only when no safetensors file exists and ``allow_pickle=True``;
    they are then read with ``torch.load(weights_only=True)`` (torch >= 2.6 required). Otherwise a
    FileNotFoundError names the folder, the variant and the weight files that do exist.
    """
    check_weights_name(weights_name)
    check_variant(variant)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: no such directory {str(folder)!r}")
    found = _lookup(folder, weights_name, variant)
    if found is not None:
        return found
    found = _lookup(folder, pickle_weights_name(weights_name), variant, is_pickle=True)
    existing = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".json")))
    where = f"{str(folder)!r} (variant={variant!r})"
    if found is not None and not allow_pickle:
        raise FileNotFoundError(
            f"only pickle weights {[p.name for p in found.files]} found in {where}; pickle files can run code "
            "when loaded: convert them to safetensors, or pass allow_pickle=True to read them with "
            "torch.load(weights_only=True)"
        )
    if found is None:
        wanted = [add_variant(weights_name, variant), index_name(weights_name, variant)]
        raise FileNotFoundError(f"no weights {wanted} in {where}; weight/config files there: {existing}")
    return found


def _lookup(folder: Path, weights_name: str, variant: str | None, is_pickle: bool = False) -> WeightFiles | None:
    index_path = folder / index_name(weights_name, variant)
    if index_path.is_file():
        weight_map = read_index(index_path)
        files = tuple(folder / name for name in dict.fromkeys(weight_map.values()))
        return WeightFiles(folder, files, weight_map, index_path, is_pickle)
    single = folder / add_variant(weights_name, variant)
    if single.is_file():
        return WeightFiles(folder, (single,), None, None, is_pickle)
    return None
