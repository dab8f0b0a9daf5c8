"""The framework-neutral pipeline container: components, ``from_pretrained``, ``save_pretrained``.

A backend subclasses :class:`PipelineBase` once (its ``DiffusionPipeline``), giving the table of
component classes it provides and a registry of pipeline classes; concrete pipelines (``DDPMPipeline``,
...) subclass that and name their components. ``DiffusionPipeline.from_pretrained`` dispatches on
``model_index.json``'s ``_class_name``; a concrete class loads any folder holding its components.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from diffusion_core.atomic import atomic_folder
from diffusion_core.pipelines.components import (
    ComponentClass,
    canonical_class_name,
    component_kind,
    hub_folders,
    library_of,
    load_component,
    lookup_component_class,
    save_component,
)
from diffusion_core.pipelines.hub import resolve_pipeline_folder
from diffusion_core.pipelines.model_index import ComponentSpec, ModelIndex, write_model_index

P = TypeVar("P", bound="PipelineBase")
logger = logging.getLogger(__name__)


@dataclass
class ImagePipelineOutput:
    """What a pipeline call returns: ``images`` is a list of PIL images or a (B, H, W, C) array."""

    images: Any


class PipelineBase:
    """Holds named components; loads and saves them in diffusers' folder layout."""

    # Set by each concrete pipeline: component names in ``__init__`` order, and which may be None.
    _components: ClassVar[tuple[str, ...]] = ()
    _optional_components: ClassVar[tuple[str, ...]] = ()
    # Set once per backend: {class name: ComponentClass} and {pipeline class name: "module:Class"}.
    _component_table: ClassVar[Mapping[str, ComponentClass]] = {}
    _pipeline_registry: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **components: Any) -> None:
        names = set(self._components)
        unknown = sorted(set(components) - names)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown components {unknown}; accepted: {list(self._components)}")
        for name in self._components:
            value = components.get(name)
            if value is None and name not in self._optional_components:
                raise ValueError(f"{name}: {type(self).__name__} needs this component (got None or nothing)")
            setattr(self, name, value)
        self.settings: dict[str, Any] = {}
        self.progress_bar_disabled = False
        self.finite_check = False

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Show (default) or hide the denoising progress bar, as diffusers' ``set_progress_bar_config``."""
        if not isinstance(disable, bool):
            raise ValueError(f"disable must be a bool, got {disable!r}")
        self.progress_bar_disabled = disable

    def enable_finite_check(self, enabled: bool = True) -> None:
        """Opt in (or out) of checking the final latents and decoded images for NaN/inf: a ``FloatingPointError``
        naming the likely cause instead of black or noise images. Costs one pass over the outputs per call."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        self.finite_check = enabled

    def _vae_or_error(self, method: str) -> Any:
        vae = getattr(self, "vae", None) if "vae" in self._components else None
        if vae is None:
            raise ValueError(f"{method}: {type(self).__name__} has no vae component")
        return vae

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) the batch one image at a time: less memory, same images."""
        self._vae_or_error("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        """Decode the whole batch at once again (the default)."""
        self._vae_or_error("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images in overlapping tiles blended at the seams: bounded memory at any size."""
        self._vae_or_error("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        """Decode in one piece again (the default)."""
        self._vae_or_error("disable_vae_tiling").disable_tiling()

    @property
    def components(self) -> dict[str, Any]:
        """The current components by name (reflects assignments such as ``pipe.scheduler = ...``)."""
        return {name: getattr(self, name) for name in self._components}

    @classmethod
    def _pipeline_class(cls, class_name: str) -> type[PipelineBase]:
        if cls._components:  # a concrete pipeline class loads any folder with its components
            return cls
        name = canonical_class_name(class_name)
        target = cls._pipeline_registry.get(name)
        if target is None:
            raise ValueError(
                f"model_index.json: _class_name {class_name!r} is not a pipeline of this backend; "
                f"accepted: {sorted(cls._pipeline_registry)}"
            )
        module, attr = target.split(":", 1)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model_index.json: pipeline {name!r} ({target}) is not available here: {e}") from e

    @classmethod
    def _load_plan(cls, index: ModelIndex, given: set[str]) -> dict[str, ComponentClass | None]:
        """What to load per component not ``given``: its class entry, or None (absent optional component).

        Optional components whose class this backend lacks (e.g. a safety checker) are skipped with a warning.
        """
        plan: dict[str, ComponentClass | None] = {}
        for name in cls._components:
            if name in given:
                continue
            spec = index.components.get(name)
            optional = name in cls._optional_components
            if spec is None or spec.is_absent:
                if not optional:
                    raise ValueError(f"{name}: model_index.json has no {name!r} component, which {cls.__name__} needs")
                plan[name] = None
                continue
            try:
                plan[name] = lookup_component_class(cls._component_table, spec.class_name, component=name)
            except ValueError:
                if not optional:
                    raise
                logger.warning(
                    "%s: optional component class %r is not available; loading without it", name, spec.class_name
                )
                plan[name] = None
        return plan

    @classmethod
    def from_pretrained(
        cls: type[P],
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        variant: str | None = None,
        dtype: Any = None,
        local_files_only: bool = False,
        **components: Any,
    ) -> P:
        """Load a diffusers pipeline folder or Hub repo; components passed as keywords are used as given."""

        def select(index: ModelIndex) -> list[str]:
            plan = cls._pipeline_class(index.class_name)._load_plan(index, set(components))
            return [folder for name, entry in plan.items() if entry is not None for folder in hub_folders(name, entry)]

        folder, index = resolve_pipeline_folder(
            path_or_repo_id, revision=revision, variant=variant, local_files_only=local_files_only, select=select
        )
        target = cls._pipeline_class(index.class_name)
        unknown = sorted(set(components) - set(target._components))
        if unknown:
            raise ValueError(f"{target.__name__}: unknown components {unknown}; accepted: {list(target._components)}")
        loaded = dict(components)
        for name, entry in target._load_plan(index, set(components)).items():
            loaded[name] = None if entry is None else load_component(entry, folder, name, dtype=dtype, variant=variant)
        pipe = target(**loaded)
        pipe.settings = dict(index.settings)
        return pipe

    def _model_index(self) -> ModelIndex:
        specs = {}
        for name, obj in self.components.items():
            if obj is None:
                specs[name] = ComponentSpec(name, None, None)
            else:
                specs[name] = ComponentSpec(name, library_of(obj, self._component_table), type(obj).__name__)
        return ModelIndex(type(self).__name__, specs, dict(self.settings))

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None) -> Path:
        """Write ``model_index.json`` and one subfolder per component, atomically (temp folder, then rename)."""
        target = Path(folder)
        if target.exists() and not target.is_dir():
            raise ValueError(f"folder: {str(target)!r} exists and is not a folder")
        kinds = {n: component_kind(obj, self._component_table) for n, obj in self.components.items() if obj is not None}
        with atomic_folder(target) as tmp:
            for name, kind in kinds.items():
                save_component(getattr(self, name), tmp / name, variant, kind)
            write_model_index(self._model_index(), tmp)
        return target
