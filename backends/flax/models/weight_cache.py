"""An opt-in cache of checkpoints already converted to the Flax layout, loaded without a copy.

A PyTorch-layout checkpoint must be transposed (conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out))
and cast before a Flax model can use it: for SD-1.5's UNet that is 3.3 GB of new memory and ~3 CPU seconds on
every load. With the cache on (:func:`enable_weight_cache`, or the ``DIFFUSION_CORE_FLAX_WEIGHT_CACHE``
environment variable), the first load of a checkpoint also writes its converted tensors to one file in the cache
folder, and every later load, in any process, maps that file and hands its pages to XLA as they are (XLA:CPU
adopts 64-byte-aligned host memory; other devices copy once from it). The mapping is private (copy-on-write), so
nothing a program does to its weights reaches the file.

An entry is keyed by the model class, the dtype and each weight file's real path, size, inode and modification
and change times (a file rewritten in place or replaced gets a new entry); its header records every tensor's
parameter path, layout, dtype and shape, and an entry that does not match what the model expects (or is cut short)
is rewritten, never used. Entries are written to an unnamed file that is linked into place once complete (where the
system has no unnamed files, a named temporary one from ``configuration.open_temp_file_beside``, removed on
failure), so a reader never sees a partial entry. A failure to write (no space, a read-only folder) leaves the load
as it would be without the cache, with a warning. The cache grows by one converted copy per (checkpoint, class,
dtype) loaded; delete the folder (or single files, between loads) to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.configuration import create_beside, open_temp_file_beside
from diffusion_core.weights.io import numpy_dtype

ENV_VAR = "DIFFUSION_CORE_FLAX_WEIGHT_CACHE"
MAGIC = b"DCFLAXW1"
FORMAT = 1
ALIGNMENT = 64  # bytes between tensor starts: XLA:CPU adopts 64-byte-aligned memory without copying it
DATA_ALIGNMENT = 4096  # the first tensor starts on a page
SUFFIX = ".flaxweights"

# A tensor as the model expects it: (parameter path as "a.b.kernel", axes from the PyTorch layout, dtype name, shape).
Layout = tuple[str, tuple[int, ...], str, tuple[int, ...]]

_UNSET = object()
_cache_dir: Any = _UNSET  # set by enable_weight_cache; until then the environment variable decides


def enable_weight_cache(cache_dir: str | os.PathLike | None) -> None:
    """Keep Flax-layout copies of the checkpoints ``from_pretrained`` loads in ``cache_dir`` (None: no cache).

    Overrides ``DIFFUSION_CORE_FLAX_WEIGHT_CACHE``. The folder is created on the first write. Loads with
    ``check_finite=True``, and single-file or Flax-msgpack checkpoints, always read the checkpoint itself.
    """
    global _cache_dir
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir must be a folder path or None, got {cache_dir!r}")
    if cache_dir is not None and not str(cache_dir):
        raise ValueError("cache_dir must be a folder path or None, got ''")
    _cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()


def weight_cache_dir() -> Path | None:
    """The folder of the weight cache in use, or None when it is off."""
    if _cache_dir is not _UNSET:
        return _cache_dir
    value = os.environ.get(ENV_VAR, "")
    return Path(value).expanduser() if value else None


def entry_path(model_class: type, files: tuple[Path, ...], dtype: Any) -> Path | None:
    """Where the cache keeps ``model_class`` loaded in ``dtype`` from ``files``; None when the cache is off or
    the source names no files."""
    folder = weight_cache_dir()
    if folder is None or not files:
        return None
    identity = []
    for file in files:
        real = Path(file).resolve()
        stat = real.stat()
        identity.append([str(real), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    key = {
        "format": FORMAT,
        "class": f"{model_class.__module__}.{model_class.__qualname__}",
        "dtype": np.dtype(dtype).name,
        "files": identity,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return folder / f"{digest}{SUFFIX}"


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _nbytes(shape: Any, dtype_name: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype_name).itemsize


def _data_start(body_length: int) -> int:
    """Where an entry's first tensor starts, after the magic, the header length and a header of ``body_length``."""
    return _aligned(len(MAGIC) + 8 + body_length, DATA_ALIGNMENT)


def _header(layout: Mapping[str, Layout]) -> tuple[bytes, dict[str, int]]:
    """The encoded header of an entry holding ``layout``'s tensors, and each tensor's file offset."""
    sizes = {key: _nbytes(shape, name) for key, (_, _, name, shape) in layout.items()}
    relative, position = {}, 0
    for key in sorted(layout):
        relative[key] = position
        position = _aligned(position + sizes[key], ALIGNMENT)
    # the data start depends on the header's length, which depends on the offsets: offsets are stored relative
    tensors = {
        key: {"path": path, "axes": list(axes), "dtype": name, "shape": list(shape), "offset": relative[key]}
        for key, (path, axes, name, shape) in layout.items()
    }
    body = json.dumps({"format": FORMAT, "tensors": tensors}, sort_keys=True).encode()
    start = _data_start(len(body))
    return MAGIC + struct.pack("<Q", len(body)) + body, {key: start + offset for key, offset in relative.items()}


def read_entry(path: Path, layout: Mapping[str, Layout]) -> dict[str, np.ndarray] | None:
    """``{key: array}`` mapped from the entry at ``path`` (private, copy-on-write), or None when there is no
    entry or it does not hold exactly ``layout``'s tensors in full."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(len(MAGIC) + 8)
            if len(prefix) < len(MAGIC) + 8 or prefix[: len(MAGIC)] != MAGIC:
                return None
            body = f.read(struct.unpack("<Q", prefix[len(MAGIC) :])[0])
            size = os.fstat(f.fileno()).st_size
            header = json.loads(body)
            tensors = header["tensors"]
            found = {key: (t["path"], tuple(t["axes"]), t["dtype"], tuple(t["shape"])) for key, t in tensors.items()}
            if header.get("format") != FORMAT or found != dict(layout):
                return None
            start = _data_start(len(body))
            if max((start + t["offset"] + _nbytes(t["shape"], t["dtype"]) for t in tensors.values()), default=0) > size:
                return None
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    except (FileNotFoundError, NotADirectoryError):  # no entry (yet)
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as error:  # not an entry
        warnings.warn(f"weight cache: ignoring {str(path)!r} ({error})", stacklevel=3)
        return None
    arrays = {}
    for key, t in tensors.items():
        dtype = numpy_dtype(t["dtype"])
        count = int(np.prod(t["shape"], dtype=np.int64))
        if count == 0:
            arrays[key] = np.empty(t["shape"], dtype)
            continue
        arrays[key] = np.frombuffer(mapped, dtype, count=count, offset=start + t["offset"]).reshape(t["shape"])
    return arrays


def write_entry(path: Path, hosts: Mapping[str, np.ndarray], layout: Mapping[str, Layout]) -> dict[str, np.ndarray]:
    """Write ``hosts`` (in ``layout``) as the entry at ``path``, then return them mapped from it.

    On any OSError (no space, no permission) the entry is not made, a warning says why, and ``hosts`` is returned.
    """
    try:
        _write(path, hosts, layout)
    except OSError as error:
        warnings.warn(f"weight cache: could not write {str(path)!r}: {error}; loaded without the cache", stacklevel=3)
        return dict(hosts)
    mapped = read_entry(path, layout)
    return dict(hosts) if mapped is None else mapped


def _write(path: Path, hosts: Mapping[str, np.ndarray], layout: Mapping[str, Layout]) -> None:
    header, offsets = _header(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = _open_unnamed(path)
    try:
        _write_all(fd, header, 0)
        for key, offset in offsets.items():
            array = np.ascontiguousarray(hosts[key])
            _write_all(fd, memoryview(array.reshape(-1).view(np.uint8)), offset)
        os.ftruncate(fd, max([len(header)] + [offsets[k] + hosts[k].nbytes for k in offsets]))
        if temporary is None:  # an unnamed file: give it a temporary name beside the entry
            temporary = create_beside(path, lambda name: _link_unnamed(fd, name))[1]
        os.replace(temporary, path)
        temporary = None
    finally:
        os.close(fd)
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _open_unnamed(path: Path) -> tuple[int, Path | None]:
    """A new file to write the entry in: unnamed in ``path``'s folder (Linux ``O_TMPFILE``: a killed writer leaves
    nothing behind), else a hidden named one beside ``path``, returned with its name."""
    unnamed = getattr(os, "O_TMPFILE", 0)
    if unnamed and Path("/proc/self/fd").is_dir():
        try:
            return os.open(path.parent, unnamed | os.O_WRONLY, 0o666), None  # the umask applies, as to any new file
        except OSError:
            pass  # a filesystem without unnamed files
    return open_temp_file_beside(path)


def _link_unnamed(fd: int, path: Path) -> None:
    """Give the unnamed file ``fd`` the name ``path`` (``linkat(AT_SYMLINK_FOLLOW)`` on ``/proc/self/fd/N``: a plain
    ``link`` would link that magic symlink itself). ``os.link`` calls ``linkat`` only when given a folder fd."""
    root = os.open("/", os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
