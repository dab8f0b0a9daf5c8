"""Reading and validating a safetensors header before any tensor is touched.

A checkpoint from a stranger may be truncated, forged or corrupt. Every safetensors file this library
reads goes through :func:`read_header` first, which checks, with no allocation beyond the header itself:
the 8-byte length against the file size (and safetensors' own 100 MB header cap), that the header is a
JSON object of entries ``{dtype, shape, data_offsets}``, that each entry's byte count equals
``prod(shape) * itemsize``, and that the entries tile the data section exactly (no overlap, no gap, no
trailing bytes). Any failure is an :class:`InvalidCheckpointError` (a ValueError) naming the file and
what is wrong, instead of the raw error safetensors would raise later.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

# safetensors dtype tag -> (numpy dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
METADATA_KEY = "__metadata__"


class InvalidCheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be (the message names the file)."""


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file: numpy dtype name, shape, and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Header(NamedTuple):
    """A validated header: the entries by key, the data section's offset in the file, and the metadata."""

    tensors: dict[str, TensorEntry]
    data_start: int  # 8 + header length
    metadata: dict[str, str]


def _fail(path: Path, reason: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"invalid safetensors file {str(path)!r}: {reason}")


def _entry(path: Path, key: str, raw: Any) -> TensorEntry:
    """One header entry, checked for form and for a byte count that matches its dtype and shape."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {key!r} must have exactly dtype, shape and data_offsets, got {raw!r}")
    tag, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if tag not in DTYPES:
        raise _fail(path, f"tensor {key!r} has unknown dtype {tag!r} (accepted: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor {key!r} has shape {shape!r}; expected a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor {key!r} has data_offsets {offsets!r}; expected [start, end] with 0 <= start <= end")
    name, itemsize = DTYPES[tag]
    nbytes = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(
            path,
            f"tensor {key!r} ({tag}, shape {shape}) needs {nbytes} bytes but data_offsets {offsets} "
            f"span {offsets[1] - offsets[0]}",
        )
    return TensorEntry(name, tuple(shape), offsets[0], offsets[1])


def _check_tiling(path: Path, tensors: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors' byte ranges cover ``[0, data_size)`` exactly once, in some order."""
    position = 0
    for key, entry in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != position:
            what = "overlaps the previous tensor" if entry.start < position else f"leaves a gap at byte {position}"
            raise _fail(path, f"tensor {key!r} at data_offsets [{entry.start}, {entry.end}] {what}")
        position = entry.end
    if position != data_size:
        if position > data_size:
            raise _fail(path, f"the tensors need {position} data bytes but the file holds {data_size} (truncated?)")
        raise _fail(path, f"{data_size - position} trailing bytes after the last tensor")


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of the safetensors file ``path`` (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise _fail(path, f"{size} bytes is too short for the 8-byte header length")
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + length > size:
            raise _fail(path, f"header length {length} runs past the end of the {size}-byte file (truncated?)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, f"{METADATA_KEY} must map str to str, got {metadata!r}")
    tensors = {key: _entry(path, key, value) for key, value in header.items()}
    _check_tiling(path, tensors, size - 8 - length)
    return Header(tensors, 8 + length, metadata)
