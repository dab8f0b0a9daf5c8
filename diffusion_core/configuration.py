"""Reading and writing diffusers-format JSON configs (``scheduler_config.json``, ``config.json``).

A config is a plain mapping of JSON values. diffusers writes every ``__init__`` argument,
sorted, plus ``_class_name`` and ``_diffusers_version``; we read and write the same bytes.
In memory, a model's or scheduler's ``.config`` is a ``FrozenConfig``: read-only, with
attribute access (``unet.config.sample_size``) beside item access (``unet.config["sample_size"]``).
Files are written atomically with the permissions of a normally created file (umask applies).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

# The diffusers release whose on-disk format we write (and test against).
DIFFUSERS_FORMAT_VERSION = "0.42.1"

T = TypeVar("T")


class FrozenConfig(Mapping[str, Any]):
    """A read-only config mapping with attribute access: ``cfg.sample_size`` is ``cfg["sample_size"]``.

    Equal to a dict with the same items; ``dict(cfg)``, ``{**cfg, "k": v}``, ``cfg.get(k)`` and
    ``copy``/``pickle`` work as for a dict. Values are kept as given (a tuple stays a tuple), so
    ``json.dumps(dict(cfg))`` serialises it. Hashable on its keys (equal configs have equal keys),
    so a model holding one can be a static value under ``jax.jit``. Changing a value means
    building a new object: ``Model.from_config({**model.config, "sample_size": 64})``.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"FrozenConfig: expected a mapping of option -> value, got {type(data).__name__}")
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; dunders (copy's __deepcopy__ probe) are never keys
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no option {name!r}; options: {sorted(self._data)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(_read_only(f"set config.{name}"))

    def __delattr__(self, name: str) -> None:
        raise AttributeError(_read_only(f"delete config.{name}"))

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(_read_only(f"set config[{key!r}]"))

    def __delitem__(self, key: str) -> None:
        raise TypeError(_read_only(f"delete config[{key!r}]"))

    def __hash__(self) -> int:
        return hash(frozenset(self._data))

    def __reduce__(self) -> tuple:
        return type(self), (self._data,)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(k for k in self._data if k.isidentifier())})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


def _read_only(action: str) -> str:
    return (
        f"cannot {action}: a config is read-only; build a new object instead, "
        "e.g. type(obj).from_config({**obj.config, key: value})"
    )


def to_json_value(value: Any) -> Any:
    """Turn numpy arrays/scalars and tuples into plain JSON values (lists, floats, ints)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    return value


def read_json_config(source: str | os.PathLike, config_name: str, subfolder: str | None = None) -> dict:
    """Load a config from a JSON file or from a folder holding ``config_name``."""
    path = Path(source)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        path = path / config_name
    if not path.is_file():
        raise FileNotFoundError(
            f"config: no such file {str(path)!r}; pass a dict, a JSON file or a folder holding {config_name!r}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {str(path)!r} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"config: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def config_to_json_string(config: Mapping[str, Any]) -> str:
    """Serialise exactly as diffusers does: sorted keys, two-space indent, trailing newline."""
    return json.dumps(to_json_value(dict(config)), indent=2, sort_keys=True) + "\n"


_TEMP_HEX_BYTES = 6


def temp_name_pattern(name: str) -> str:
    """A regex matching the temporary names :func:`create_beside` gives for ``name`` (see diffusion_core.atomic)."""
    return rf"\.{re.escape(name)}\.tmp-[0-9a-f]{{{2 * _TEMP_HEX_BYTES}}}"


def create_beside(target: Path, create: Callable[[Path], T]) -> tuple[T, Path]:
    """``create(tmp)`` for a fresh hidden name ``tmp`` next to ``target`` (retried on a name clash)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(_TEMP_HEX_BYTES)}")
        try:
            return create(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {str(target)!r}")


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted save of ``target`` left beside it; returns what was removed.

    Only names this library creates are touched: ``.<name>.tmp-<12 hex>`` (files or folders) and
    ``.<name>.tmp-<12 hex>.old`` (an old folder moved aside).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(temp_name_pattern(target.name) + r"(\.old)?")
    removed = []
    for entry in target.parent.iterdir():
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def make_temp_dir_beside(target: str | os.PathLike) -> Path:
    """A new empty hidden folder next to ``target`` (to fill, then rename into place).

    Unlike ``tempfile.mkdtemp`` (always 0700) it is created as any folder is, so the umask (and
    a default ACL) decides its permissions: 0755 under umask 022, as diffusers' output folders.
    """
    return create_beside(Path(target), os.mkdir)[1]


def open_temp_file_beside(path: Path) -> tuple[int, Path]:
    """A new hidden file next to ``path``, mode 0666 less the umask (``mkstemp`` would force 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return create_beside(path, lambda tmp: os.open(tmp, flags, 0o666))


def set_created_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a file newly created beside it gets (umask and default ACL applied).

    For files another library writes privately (safetensors' writer renames a 0600 temporary file
    into place). The mode is read from a probe file, not from ``os.umask``, which is process-wide
    and cannot be read without being set.
    """
    path = Path(path)
    fd, probe = open_temp_file_beside(path)
    try:
        mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
        os.unlink(probe)
    os.chmod(path, mode)


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, then rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The file gets the permissions of a normally created one (0644 under umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # left by a writer that was killed
    fd, tmp = open_temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
