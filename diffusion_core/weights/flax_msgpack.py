"""Flax ``*.msgpack`` checkpoints (diffusers' ``diffusion_flax_model.msgpack``, transformers' ``flax_model.msgpack``).

Reading is safe: the msgpack stream is decoded with a hook that accepts only flax.serialization's
ndarray / numpy-scalar extensions, of plain numeric dtypes, whose byte counts match their shapes
(no pickle, no objects). The nested parameter tree is renamed to PyTorch keys and layouts by the
one converter (``convert.flax_to_torch``): diffusers-Flax names ``down_blocks_0`` become
``down_blocks.0`` (``linear_1``/``linear_2`` are real names and stay), the Flax VAE attention's
``query/key/value/proj_attn`` become ``to_q/to_k/to_v/to_out.0``; bfloat16 is upcast to float32.
Writing is the inverse, from a PyTorch-named state dict and the model's Flax paths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.configuration import write_bytes_atomic
from diffusion_core.weights.convert import FlaxPath, flax_to_torch, match_torch_key

DIFFUSERS_FLAX_WEIGHTS_NAME = "diffusion_flax_model.msgpack"
TRANSFORMERS_FLAX_WEIGHTS_NAME = "flax_model.msgpack"

_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3  # flax.serialization's msgpack extension codes
_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bfloat16",
}  # fmt: skip
_KEEP_SUFFIXED = {"linear_1", "linear_2"}  # torch names that end in _<digit> themselves (TimestepEmbedding)
_NUMBERED = re.compile(r"^(.+)_(\d+)$")
# the Flax VAE attention block's names -> the PyTorch (diffusers >= 0.14) attention names
_ATTENTION_NAMES: dict[str, tuple[str | int, ...]] = {
    "query": ("to_q",),
    "key": ("to_k",),
    "value": ("to_v",),
    "proj_attn": ("to_out", 0),
}


def _msgpack():
    try:
        import msgpack
    except ImportError as e:  # pragma: no cover - msgpack comes with the flax extra
        raise ImportError("reading Flax .msgpack weights needs the msgpack package (pip install msgpack)") from e
    return msgpack


def _dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise ValueError(f"msgpack: array dtype {name!r} is not accepted; accepted: {sorted(_DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _decode_array(data: bytes) -> np.ndarray:
    """flax's ndarray encoding ``(shape, dtype name, C-order bytes)``, checked before any copy."""
    fields = _msgpack().unpackb(data, raw=False)
    if not (isinstance(fields, list) and len(fields) == 3):
        raise ValueError("msgpack: malformed array entry (expected shape, dtype, bytes)")
    shape, name, buffer = fields
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"msgpack: malformed array shape {shape!r}")
    if not isinstance(name, str) or not isinstance(buffer, bytes):
        raise ValueError("msgpack: malformed array entry (dtype must be a name, data bytes)")
    dtype = _dtype(name)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(f"msgpack: array of shape {tuple(shape)} {name} needs {expected} bytes, got {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_array(data)
    if code == _EXT_NPSCALAR:
        return _decode_array(data)[()]
    raise ValueError(f"msgpack: extension type {code} is not accepted (only flax's ndarray and numpy scalar)")


def read_flax_tree(path: str | os.PathLike) -> dict[str, Any]:
    """The nested ``{name: {...: array}}`` parameter tree of a Flax msgpack file (arrays only, checked)."""
    data = Path(path).read_bytes()
    tree = _msgpack().unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    if isinstance(tree, dict) and set(tree) == {"params"}:  # a saved {"params": ...} variables dict
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise ValueError(f"msgpack: {str(path)!r} does not hold a parameter tree (a map of names)")
    return tree


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, name))
        elif isinstance(value, np.ndarray):
            yield (*prefix, name), value
        else:
            raise ValueError(f"msgpack: {'/'.join((*prefix, name))} is a {type(value).__name__}, not an array")


def _torch_path(flax_path: tuple[str, ...]) -> FlaxPath:
    """diffusers/transformers Flax names -> the NNX path our converter speaks (``down_blocks_0`` -> down_blocks, 0)."""
    out: list[str | int] = []
    for part in flax_path:
        numbered = _NUMBERED.match(part)
        if part.isdigit():
            out.append(int(part))
        elif numbered and part not in _KEEP_SUFFIXED:
            out.extend((numbered.group(1), int(numbered.group(2))))
        else:
            out.append(part)
    if len(out) >= 2 and out[-2] in _ATTENTION_NAMES:
        out[-2:-1] = _ATTENTION_NAMES[out[-2]]
    return tuple(out)


def read_flax_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A Flax msgpack checkpoint as a PyTorch-named, PyTorch-layout state dict (bfloat16 upcast to float32)."""
    items = []
    for flax_path, array in _leaves(read_flax_tree(path)):
        if array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        items.append((_torch_path(flax_path), array))
    return dict(flax_to_torch(items))


def _flax_name(path: FlaxPath, numbered_as: str) -> tuple[str, ...]:
    """The inverse of ``_torch_path`` for one NNX path: ``numbered_as`` "suffix" (diffusers) or "key" (transformers)."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            if numbered_as == "suffix" and out:
                out[-1] = f"{out[-1]}_{part}"
            else:
                out.append(str(part))
        else:
            out.append(part)
    return tuple(out)


def write_flax_msgpack(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[FlaxPath, tuple[int, ...]],
    path: str | os.PathLike,
    numbered_as: str = "suffix",
) -> Path:
    """Write a PyTorch-named ``state_dict`` as a Flax msgpack tree over the model's NNX ``target`` paths.

    ``numbered_as``: "suffix" writes diffusers' ``down_blocks_0``, "key" transformers' ``layers/0``.
    """
    if numbered_as not in ("suffix", "key"):
        raise ValueError(f"numbered_as: must be 'suffix' (diffusers) or 'key' (transformers), got {numbered_as!r}")
    tree: dict[str, Any] = {}
    for key, array in state_dict.items():
        match = match_torch_key(key, target)
        if match is None:
            raise ValueError(f"state_dict: key {key!r} matches no parameter of the target")
        flax_path, rule = match
        node = tree
        *parents, leaf = _flax_name(flax_path, numbered_as)
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.ascontiguousarray(rule.flax_array(np.asarray(array)))
    return _pack(tree, Path(path))


def _pack(tree: Mapping[str, Any], path: Path) -> Path:
    msgpack = _msgpack()

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(_EXT_NDARRAY, payload)
        raise ValueError(f"msgpack: cannot write a {type(obj).__name__}")

    write_bytes_atomic(path, msgpack.packb(tree, default=default, use_bin_type=True))
    return path
