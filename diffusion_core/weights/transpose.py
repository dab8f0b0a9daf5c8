"""Fast contiguous transposes of checkpoint tensors (numpy), for the layout changes of the converter.

``np.ascontiguousarray(np.transpose(a, axes))`` walks the output in order and reads the input with a
large stride: for a conv kernel (O, I, 3, 3) -> (3, 3, I, O) or a linear weight (out, in) -> (in, out)
nearly every read touches a new cache line (about 1 GB/s on one core). :func:`transpose_copy` makes
the same copy tile by tile: a tile spans ``BLOCK`` indices of the input axis that becomes the output's
last axis and ``TILE_BYTES`` of the one that becomes its second-to-last, so the input lines a tile
reads stay in cache while it is written out. The result is a new C-contiguous array aligned to 64
bytes, so XLA:CPU can adopt it without another copy.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

ALIGNMENT = 64  # bytes; XLA:CPU's minimum alignment for adopting host memory without a copy
BLOCK = 256  # tile length along the input axis that becomes the output's last axis
MAPPED_BYTES = 1 << 20  # arrays this large get their own memory map (see aligned_empty)
TILE_BYTES = 1024  # tile width, in input bytes, along the axis that becomes the output's second-to-last
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages are faulted in as they are written


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGNMENT``-byte boundary.

    From ``MAPPED_BYTES`` up it lives in its own anonymous memory map (page-aligned, returned to the system when
    the array dies): numpy would ask for transparent huge pages there, and on a busy machine faulting those in
    (with compaction) cost more system time than the copy itself (3.3 GB of weights: ~7 s against ~3 s). The map
    is populated when made (``MAP_POPULATE``, Linux): one call faults in all its pages, half the system time of
    faulting them one by one as the copy first writes them (3.3 GB: ~0.9 s against ~1.9 s).
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if nbytes >= MAPPED_BYTES:
        if _POPULATE:
            mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
        else:
            mapped = mmap.mmap(-1, nbytes)
        return np.frombuffer(mapped, dtype, count=count).reshape(tuple(shape))
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


def _merge_axes(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same transpose on fewer axes: input axes that stay adjacent and in order are merged into one."""
    groups: list[list[int]] = []
    for axis in axes:
        if groups and groups[-1][-1] + 1 == axis:
            groups[-1].append(axis)
        else:
            groups.append([axis])
    by_start = sorted(groups, key=lambda g: g[0])
    merged_shape = tuple(int(np.prod([shape[a] for a in g], dtype=np.int64)) for g in by_start)
    merged_axes = tuple(by_start.index(g) for g in groups)
    return merged_shape, merged_axes


def transpose_copy(array: np.ndarray, axes: Sequence[int], dtype: np.dtype | None = None) -> np.ndarray:
    """``np.transpose(array, axes)`` as a new C-contiguous, 64-byte-aligned array, cast to ``dtype`` if given."""
    array = np.asarray(array)
    axes = tuple(int(a) for a in axes)
    if sorted(axes) != list(range(array.ndim)):
        raise ValueError(f"axes must be a permutation of range({array.ndim}), got {axes}")
    out = aligned_empty(tuple(array.shape[a] for a in axes), array.dtype if dtype is None else dtype)
    shape, merged = _merge_axes(array.shape, axes)
    source = np.ascontiguousarray(array).reshape(shape)
    view = out.reshape(tuple(shape[a] for a in merged))
    if len(merged) < 2 or merged[-1] == len(shape) - 1 or out.size == 0:  # rows stay rows: a streaming copy
        view[...] = source.transpose(merged)
        return out
    outer, inner = merged[-1], merged[-2]  # the input axes that become the output's last two
    inner_block = max(1, TILE_BYTES // source.strides[inner])
    for i in range(0, shape[outer], BLOCK):
        for j in range(0, shape[inner], inner_block):
            index = [slice(None)] * len(shape)
            index[outer], index[inner] = slice(i, i + BLOCK), slice(j, j + inner_block)
            view[tuple(index[a] for a in merged)] = source[tuple(index)].transpose(merged)
    return out
