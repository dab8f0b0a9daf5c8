"""Reading and writing diffusers-format JSON configs (``scheduler_config.json``, ``config.json``).

A config is a plain mapping of JSON values. diffusers writes every ``__init__`` argument,
sorted, plus ``_class_name`` and ``_diffusers_version``; we read and write the same bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The diffusers release whose on-disk format we write (and test against).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


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


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
