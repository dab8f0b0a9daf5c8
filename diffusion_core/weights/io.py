"""Reading checkpoints lazily: one tensor at a time (memory-mapped for torch), for numpy, torch or jax.

Only numpy and safetensors are imported here; torch (``framework="pt"``), jax
(``framework="flax"``) and ml_dtypes (bfloat16) are imported when a call asks for them.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors import safe_open

from diffusion_core.weights.layout import DIFFUSERS_WEIGHTS_NAME, WeightFiles, resolve_weight_files
from diffusion_core.weights.safetensors_header import Header, InvalidCheckpointError, read_header

FRAMEWORKS = {"numpy": "numpy", "np": "numpy", "pt": "pt", "torch": "pt", "flax": "flax", "jax": "flax"}
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
TensorInfo = tuple[str, tuple[int, ...]]
Source = str | os.PathLike | WeightFiles


def numpy_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """A numpy dtype from a name, numpy type or ml_dtypes type (``"bfloat16"`` imports ml_dtypes)."""
    if isinstance(dtype, str) and dtype in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{name} must be a numpy dtype or one of {list(_ML_DTYPES)}, got {dtype!r}") from e


def as_numpy(array: Any) -> np.ndarray:
    """A host numpy array from numpy, torch (any device, bfloat16 included), jax or any ``__array__``."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.split(".")[0] == "torch":
        import torch

        tensor = array.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
        return tensor.numpy()
    if not hasattr(array, "__array__"):
        raise ValueError(f"expected an array (numpy, torch, jax or any object with __array__), got {type(array)}")
    return np.asarray(array)


def nonfinite_mask(values: Any) -> np.ndarray:
    """Where ``values`` (numpy, torch, jax; bfloat16 included) hold NaN or inf; all False for non-float arrays."""
    array = as_numpy(values)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        return np.zeros(array.shape, bool)
    return ~np.isfinite(array.astype(np.float32, copy=False))


def _resolve(source: Source, weights_name: str, variant: str | None, allow_pickle: bool) -> WeightFiles:
    if isinstance(source, WeightFiles):
        return source
    return resolve_weight_files(source, weights_name=weights_name, variant=variant, allow_pickle=allow_pickle)


def read_pickle_state_dict(path: str | os.PathLike, *, unwrap_lightning: bool = False) -> dict[str, Any]:
    """A flat ``{key: torch.Tensor}`` from a pickle file, read with ``torch.load(weights_only=True)`` (torch >= 2.6).

    ``unwrap_lightning``: a PyTorch Lightning checkpoint ``{"state_dict": {...}, "global_step": ...}``
    yields its ``state_dict`` (non-tensor entries there are dropped); otherwise the file must hold
    a flat dict of tensors (ValueError).
    """
    import torch

    path = Path(path)
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):
        raise RuntimeError(f"reading pickle file {str(path)!r} needs torch >= 2.6 (CVE-2025-32434)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # weights_only refuses anything but tensors and plain containers: code in the file never runs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidCheckpointError(f"pickle file {str(path)!r} cannot be loaded safely: {reason}") from None
    if unwrap_lightning and isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pickle file {str(path)!r} does not hold a flat {{key: tensor}} state dict")
    return state


def file_infos(
    path: str | os.PathLike, is_pickle: bool = False, unwrap_lightning: bool = False
) -> dict[str, TensorInfo]:
    """``{key: (dtype name, shape)}`` of one file; for safetensors only its header is read.

    ``unwrap_lightning`` applies to pickle files (see :func:`read_pickle_state_dict`).
    """
    path = Path(path)
    if is_pickle:
        state = read_pickle_state_dict(path, unwrap_lightning=unwrap_lightning)
        return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}
    return {key: (entry.dtype, entry.shape) for key, entry in read_header(path).tensors.items()}


def capped(items: Sequence[str], limit: int) -> str:
    """``"N: [a, b, ...]"``: a count and at most ``limit`` items, for error messages."""
    shown = ", ".join(items[:limit])
    return f"{len(items)}: [{shown}{', ...' if len(items) > limit else ''}]"


def validate_index(files: WeightFiles, limit: int = 20) -> dict[str, TensorInfo]:
    """Check a shard index against its shards (headers only) and return ``{key: (dtype, shape)}``.

    Every listed file must exist, every listed key must be in its file, and no shard may hold a
    key the index does not assign to it. The ValueError lists the offending keys.
    """
    if files.weight_map is None:
        return {}
    missing_files = [p.name for p in files.files if not p.is_file()]
    if missing_files:
        keys = sorted(k for k, v in files.weight_map.items() if v in missing_files)
        raise FileNotFoundError(
            f"shard index {str(files.index_file)!r} lists files missing from {str(files.folder)!r}: "
            f"{missing_files}; their keys {capped(keys, limit)}"
        )
    infos: dict[str, TensorInfo] = {}
    absent, extra = [], []
    for path in files.files:
        held = file_infos(path, files.is_pickle)
        listed = {k for k, v in files.weight_map.items() if v == path.name}
        absent += sorted(f"{k} ({path.name})" for k in listed - held.keys())
        extra += sorted(f"{k} ({path.name})" for k in held.keys() - listed)
        infos.update((k, v) for k, v in held.items() if k in listed)
    if absent or extra:
        raise ValueError(
            f"shard index {str(files.index_file)!r} does not match its shards: keys listed but absent "
            f"{capped(absent, limit)}; keys in shards but not listed there {capped(extra, limit)}"
        )
    return infos


def tensor_infos(
    source: Source,
    *,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> dict[str, TensorInfo]:
    """``{key: (dtype name, shape)}`` for a checkpoint folder (or resolved files), from headers only.

    Dtype names are numpy's (``"float32"``, ``"float16"``, ``"bfloat16"``). Sharded checkpoints are
    validated against their index first (see ``validate_index``).
    """
    files = _resolve(source, weights_name, variant, allow_pickle)
    if files.weight_map is not None:
        return validate_index(files)
    return file_infos(files.files[0], files.is_pickle)


def cast_tensor(tensor: Any, dtype: np.dtype | None, framework: str) -> Any:
    """``tensor`` (of ``framework``: ``"numpy"``, ``"pt"`` or ``"flax"``) cast to ``dtype``; None keeps it."""
    if dtype is None:
        return tensor
    if framework == "pt":
        import torch

        return tensor.to(getattr(torch, dtype.name))
    return tensor.astype(dtype)


def from_torch(tensor: Any, framework: str) -> Any:
    """A torch tensor as ``framework``'s array: itself (``"pt"``), a jax array (``"flax"``) or numpy."""
    if framework == "pt":
        return tensor
    array = as_numpy(tensor)
    if framework == "flax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def numpy_to_framework(array: np.ndarray, framework: str) -> Any:
    """A numpy array as ``framework``'s: a torch tensor (``"pt"``), a jax array (``"flax"``) or itself."""
    if framework == "pt":
        import torch

        array = np.ascontiguousarray(array)
        return torch.from_numpy(array if array.flags.writeable else array.copy())  # torch tensors are writable
    if framework == "flax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


Converter = Callable[[str, np.ndarray], Any]  # (key, array) -> what a tensor stream yields instead of the array


def iter_tensors(
    source: Source,
    *,
    framework: str = "numpy",
    dtype: Any = None,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
    variant: str | None = None,
    allow_pickle: bool = False,
    validate: bool = True,
    convert: Converter | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, tensor)`` one at a time from a checkpoint folder (or resolved files).

    Files are memory-mapped; each tensor is materialised only when yielded, and cast to
    ``dtype`` (a numpy dtype or ``"bfloat16"``) if given. ``framework`` is ``"numpy"``,
    ``"pt"`` (torch tensors) or ``"flax"`` (jax arrays). Shard indexes are validated first
    unless ``validate=False``. Keys come file by file, in each file's key order. ``convert`` (numpy only):
    the stream yields ``(key, convert(key, array))`` instead, where ``array`` may view a memory map of the file
    that is dropped once ``convert`` returns (a consumer that copies each tensor keeps no file pages resident),
    and safetensors files are mapped and converted on ``workers`` threads (see :func:`read_safetensors_plain`).
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}")
    framework = FRAMEWORKS[framework]
    if convert is not None and framework != "numpy":
        raise ValueError(f"convert is applied to numpy arrays: framework must be 'numpy', got {framework!r}")
    check_workers(workers)
    target = None if dtype is None else numpy_dtype(dtype)
    files = _resolve(source, weights_name, variant, allow_pickle)
    if validate:
        validate_index(files)
    if convert is None:
        return _generate(files, framework, target)
    return _generate_converted(files, target, convert, workers)


def default_workers() -> int:
    """Threads for reading and converting a checkpoint: the cores this process may run on, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def check_workers(workers: Any) -> None:
    """ValueError unless ``workers`` (threads reading and converting tensors) is a positive int."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")


def _generate(files: WeightFiles, framework: str, target: np.dtype | None) -> Iterator[tuple[str, Any]]:
    for path in files.files:
        if files.is_pickle:
            for key, tensor in read_pickle_state_dict(path).items():
                yield key, cast_tensor(from_torch(tensor, framework), target, framework)
            continue
        if framework == "pt":  # memory-mapped: torch assigns the mapped tensors, so the pages are the weights
            read_header(path)  # validated before safetensors maps it
            with safe_open(path, framework=framework) as f:
                for key in f.keys():
                    yield key, cast_tensor(f.get_tensor(key), target, framework)
            continue
        for key, array in read_safetensors_plain(path):
            yield key, cast_tensor(from_torch(array, framework), target, framework)


def _generate_converted(
    files: WeightFiles, target: np.dtype | None, convert: Converter, workers: int
) -> Iterator[tuple[str, Any]]:
    def cast_then_convert(key: str, array: np.ndarray) -> Any:
        return convert(key, cast_tensor(array, target, "numpy"))

    for path in files.files:
        if files.is_pickle:
            for key, tensor in read_pickle_state_dict(path).items():
                yield key, cast_then_convert(key, as_numpy(tensor))
            continue
        yield from read_safetensors_plain(path, cast_then_convert, workers)


def converted(items: Iterable[tuple[str, Any]], convert: Converter | None) -> Iterator[tuple[str, Any]]:
    """``(key, convert(key, value))`` for each item (the items themselves when ``convert`` is None)."""
    for key, value in items:
        yield key, value if convert is None else convert(key, value)


def read_safetensors_plain(
    path: str | os.PathLike, convert: Converter | None = None, workers: int = 1
) -> Iterator[tuple[str, Any]]:
    """Each tensor of a safetensors file, read with ordinary file reads into its own numpy array.

    No memory map of the whole file: a loader that copies every tensor into its own parameters (Flax, numpy)
    then holds one model plus one tensor, not a model plus the mapped file's resident pages. Keys come in
    ``safe_open``'s order (sorted). ``convert``: the stream yields ``(key, convert(key, array))`` where ``array``
    views a memory map of just that tensor, unmapped once ``convert`` returns (unless it kept a view): a consumer
    that copies each tensor then neither reads it into an intermediate buffer nor keeps the file's pages
    resident. With ``workers`` > 1, tensors are mapped and converted on that many threads, results still in
    key order (page faults and numpy copies run without the GIL).
    """
    header = read_header(path)
    keys = sorted(header.tensors)
    if convert is None:
        with open(path, "rb") as f:
            for key in keys:
                entry = header.tensors[key]
                dtype = numpy_dtype(entry.dtype)
                f.seek(header.data_start + entry.start)
                yield (
                    key,
                    np.fromfile(f, dtype=dtype, count=(entry.end - entry.start) // dtype.itemsize).reshape(entry.shape),
                )
        return
    yield from _read_converted(Path(path), header, keys, convert, workers)


def _read_converted(
    path: Path, header: Header, keys: list[str], convert: Converter, workers: int
) -> Iterator[tuple[str, Any]]:
    def job(file: BinaryIO, key: str) -> tuple[str, Any]:
        entry = header.tensors[key]
        dtype = numpy_dtype(entry.dtype)
        start, size = header.data_start + entry.start, entry.end - entry.start
        if size == 0:
            return key, convert(key, np.empty(entry.shape, dtype))
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(file.fileno(), start + size - base, access=mmap.ACCESS_READ, offset=base)
        array = np.frombuffer(mapped, dtype, count=size // dtype.itemsize, offset=start - base).reshape(entry.shape)
        result = convert(key, array)
        del array
        try:
            mapped.close()
        except BufferError:  # convert kept a view: the map lives as long as that view
            pass
        return key, result

    with open(path, "rb") as file:
        if workers == 1:
            for key in keys:
                yield job(file, key)
            return
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(job, file, key) for key in keys]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:  # a consumer that stops early (or an error) leaves the rest unread
                    future.cancel()


def load_tensors(source: Source, **kwargs: Any) -> dict[str, Any]:
    """All tensors of a checkpoint as a dict; same arguments as ``iter_tensors``."""
    return dict(iter_tensors(source, **kwargs))


def _shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]  # a (dtype, shape) pair from tensor_infos
    return tuple(int(d) for d in value)


def check_keys(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    limit: int = 20,
    name: str = "checkpoint",
) -> None:
    """Raise ValueError listing missing keys, unexpected keys and shape mismatches (each capped at ``limit``).

    Values are shapes, or ``(dtype, shape)`` pairs as returned by ``tensor_infos``.
    """
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = sorted(
        f"{k}: expected {_shape_of(expected[k])}, got {_shape_of(found[k])}"
        for k in expected.keys() & found.keys()
        if _shape_of(expected[k]) != _shape_of(found[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {capped(missing, limit)}")
    if unexpected:
        problems.append(f"unexpected keys {capped(unexpected, limit)}")
    if mismatched:
        problems.append(f"shape mismatches {capped(mismatched, limit)}")
    if problems:
        raise ValueError(f"{name} does not match the model: " + "; ".join(problems))
