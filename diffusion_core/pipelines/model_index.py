"""``model_index.json``: which component classes a pipeline folder holds, read and written as diffusers does.

Each component entry is ``"<name>": [library, class_name]`` (``[null, null]`` for an absent
optional component); any other non-underscore entry is a plain pipeline setting
(``"requires_safety_checker": false``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_core.configuration import (
    DIFFUSERS_FORMAT_VERSION,
    config_to_json_string,
    read_json_config,
    write_json_atomic,
)

MODEL_INDEX_NAME = "model_index.json"
CLASSES_FILE = "classes.json"  # class names and the "no class" label of a class-conditional folder (ours)


@dataclass(frozen=True)
class ComponentSpec:
    """One ``model_index.json`` component entry; ``class_name is None`` means "absent" (``[null, null]``)."""

    name: str
    library: str | None
    class_name: str | None

    @property
    def is_absent(self) -> bool:
        return self.class_name is None

    def to_json(self) -> list[str | None]:
        return [self.library, self.class_name]


@dataclass(frozen=True)
class ModelIndex:
    """A parsed ``model_index.json``: pipeline class, components in file order, plain settings."""

    class_name: str
    components: dict[str, ComponentSpec]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"_class_name": self.class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
        data.update({name: spec.to_json() for name, spec in self.components.items()})
        data.update(self.settings)
        return data


def _is_component_entry(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(v is None or isinstance(v, str) for v in value)
        and (value[0] is None) == (value[1] is None)
    )


def parse_model_index(data: Mapping[str, Any]) -> ModelIndex:
    """Split a ``model_index.json`` mapping into components and settings; ValueError when malformed."""
    class_name = data.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(f"model_index.json: '_class_name' must name a pipeline class, got {class_name!r}")
    components: dict[str, ComponentSpec] = {}
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if _is_component_entry(value):
            components[key] = ComponentSpec(key, value[0], value[1])
        else:
            settings[key] = value
    return ModelIndex(class_name, components, settings)


def read_model_index(folder: str | os.PathLike) -> ModelIndex:
    """Read and parse ``<folder>/model_index.json`` (FileNotFoundError when the folder has none)."""
    return parse_model_index(read_json_config(folder, MODEL_INDEX_NAME))


def write_model_index(index: ModelIndex, folder: str | os.PathLike) -> Path:
    """Write ``model_index.json`` with diffusers' bytes (sorted keys, two-space indent), atomically."""
    path = Path(folder) / MODEL_INDEX_NAME
    write_json_atomic(path, config_to_json_string(index.to_dict()))
    return path
