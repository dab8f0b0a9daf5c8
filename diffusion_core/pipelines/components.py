"""Component classes by name: how a ``model_index.json`` entry becomes an object, and back.

Each backend lists the classes it provides as ``{class_name: ComponentClass(library, "module:attr", kind)}``
and imports them only when a pipeline needs them, so classes other packages add later (conditional
UNets, ControlNets, CLIP encoders, the tokenizer) plug in by name. Schedulers are framework-neutral
and resolved here from :data:`diffusion_core.schedulers.SCHEDULER_NAMES`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusion_core import schedulers

Kind = Literal["model", "scheduler", "tokenizer"]
_KINDS = ("model", "scheduler", "tokenizer")

# Old Flax-era folders name classes "FlaxUNet2DConditionModel", "FlaxDDIMScheduler", ...
_FLAX_PREFIX = "Flax"


@dataclass(frozen=True)
class ComponentClass:
    """Where a component class lives and how it loads: ``model`` (weights + dtype/variant),
    ``scheduler`` (a scheduler config) or ``tokenizer`` (vocabulary files)."""

    library: str
    target: str  # "package.module:ClassName", imported on first use
    kind: Kind = "model"
    # Saved as ``<name>/`` plus ``<name>_1/``, ``<name>_2/``, ... beside it (MultiControlNetModel's layout).
    sibling_folders: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if ":" not in self.target:
            raise ValueError(f"target must look like 'package.module:ClassName', got {self.target!r}")

    def resolve(self) -> type:
        module, attr = self.target.split(":", 1)
        return getattr(importlib.import_module(module), attr)


def canonical_class_name(name: str) -> str:
    """``FlaxUNet2DModel`` -> ``UNet2DModel``: Flax-era names map to the shared class names."""
    if name.startswith(_FLAX_PREFIX) and len(name) > len(_FLAX_PREFIX) and name[len(_FLAX_PREFIX)].isupper():
        return name[len(_FLAX_PREFIX) :]
    return name


def lookup_component_class(table: Mapping[str, ComponentClass], class_name: str, *, component: str) -> ComponentClass:
    """The entry for ``class_name`` (schedulers included); ValueError listing what is available."""
    name = canonical_class_name(class_name)
    if name in schedulers.SCHEDULER_NAMES:
        return ComponentClass("diffusers", f"diffusion_core.schedulers:{name}", "scheduler")
    if name in table:
        return table[name]
    raise ValueError(
        f"{component}: class {class_name!r} is not available in this backend; "
        f"known classes: {sorted(table)} and the schedulers {sorted(schedulers.SCHEDULER_NAMES)}"
    )


def load_component(
    entry: ComponentClass,
    folder: str | os.PathLike,
    name: str,
    *,
    dtype: Any = None,
    variant: str | None = None,
) -> Any:
    """Load component ``name`` from ``<folder>/<name>`` with the class ``entry`` names."""
    sub = Path(folder) / name
    if not sub.is_dir():
        raise FileNotFoundError(f"{name}: the pipeline folder has no {name!r} subfolder ({str(sub)!r})")
    cls = entry.resolve()
    if entry.kind == "scheduler":
        return cls.from_config(sub)
    if entry.kind == "tokenizer":
        return cls.from_pretrained(folder, subfolder=name)
    options: dict[str, Any] = {"subfolder": name, "variant": variant}
    if dtype is not None:
        options["dtype"] = dtype
    return cls.from_pretrained(folder, **options)


def component_kind(obj: Any, table: Mapping[str, ComponentClass]) -> Kind:
    """How ``obj`` is saved: as a scheduler config, a tokenizer or a model; ValueError for unknown classes."""
    if isinstance(obj, schedulers.Scheduler):
        return "scheduler"
    entry = table.get(type(obj).__name__)
    if entry is None:
        raise ValueError(
            f"component of class {type(obj).__name__!r} cannot be saved: "
            f"not one of this backend's classes {sorted(table)}"
        )
    return entry.kind


def save_component(obj: Any, folder: Path, variant: str | None, kind: Kind) -> None:
    """Write one component into ``folder`` in its diffusers/transformers layout."""
    if kind == "scheduler":
        obj.save_config(folder)
    elif kind == "tokenizer":
        obj.save_pretrained(folder)
    else:
        obj.save_pretrained(folder, variant=variant)


def library_of(obj: Any, table: Mapping[str, ComponentClass]) -> str:
    """The ``model_index.json`` library of a component object (``diffusers`` unless the table says otherwise)."""
    if isinstance(obj, schedulers.Scheduler):
        return "diffusers"
    entry = table.get(type(obj).__name__)
    return entry.library if entry is not None else "diffusers"


# The network classes both backends provide: class name -> (library, module under the backend's
# models package). A backend's table is these plus the shared tokenizer.
_BACKEND_MODELS: dict[str, tuple[str, str]] = {
    "UNet2DModel": ("diffusers", "unet_2d"),
    "AutoencoderKL": ("diffusers", "vae"),
    "UNet2DConditionModel": ("diffusers", "unet_2d_condition"),
    "ControlNetModel": ("diffusers", "controlnet"),
    "MultiControlNetModel": ("diffusers", "multicontrolnet"),
    "CLIPTextModel": ("transformers", "clip_text"),
    "CLIPTextModelWithProjection": ("transformers", "clip_text"),
    "T5EncoderModel": ("transformers", "t5"),
    "PriorTransformer": ("diffusers", "unclip"),
    "UnCLIPTextProjModel": ("diffusers", "unclip"),
}
_SIBLING_FOLDER_MODELS = frozenset({"MultiControlNetModel"})
_SHARED_CLASSES: dict[str, ComponentClass] = {
    "CLIPTokenizer": ComponentClass("transformers", "diffusion_core.tokenizers:CLIPTokenizer", "tokenizer"),
    "T5Tokenizer": ComponentClass("transformers", "diffusion_core.tokenizers:T5Tokenizer", "tokenizer"),
    "T5TokenizerFast": ComponentClass("transformers", "diffusion_core.tokenizers:T5TokenizerFast", "tokenizer"),
}


def hub_folders(name: str, entry: ComponentClass) -> list[str]:
    """The folders (``fnmatch`` patterns) a Hub snapshot needs for component ``name`` loaded as ``entry``."""
    return [name, f"{name}_[0-9]*"] if entry.sibling_folders else [name]


def backend_component_table(models_package: str) -> dict[str, ComponentClass]:
    """``{class name: ComponentClass}`` for a backend whose networks live in ``models_package``
    (``"diffusion_core.torch.models"``); modules are imported on first use, so missing ones only fail then."""
    table = {
        name: ComponentClass(
            library, f"{models_package}.{module}:{name}", sibling_folders=name in _SIBLING_FOLDER_MODELS
        )
        for name, (library, module) in _BACKEND_MODELS.items()
    }
    return {**table, **_SHARED_CLASSES}


# Pipeline classes both backends provide: model_index.json "_class_name" -> module under the backend's
# pipelines package. Stable Diffusion modules must export every SD name listed (they may define the
# classes in sd_*.py modules and import them there).
_BACKEND_PIPELINES: dict[str, str] = {
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
    "IFPipeline": "deepfloyd_if",
    "IFImg2ImgPipeline": "deepfloyd_if",
    "IFInpaintingPipeline": "deepfloyd_if",
    "IFImg2ImgSuperResolutionPipeline": "deepfloyd_if",
    "IFInpaintingSuperResolutionPipeline": "deepfloyd_if",
    "IFSuperResolutionPipeline": "deepfloyd_if",
    "UnCLIPPipeline": "unclip",
    **{
        f"StableDiffusion{kind}Pipeline": "stable_diffusion"
        for kind in (
            "",
            "Img2Img",
            "Inpaint",
            "InstructPix2Pix",
            "ControlNet",
            "ControlNetImg2Img",
            "ControlNetInpaint",
            "Upscale",
            "LatentUpscale",
        )  # fmt: skip
    },
    "StableDiffusionXLPipeline": "stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": "stable_diffusion_xl",
    "StableDiffusionXLInpaintPipeline": "stable_diffusion_xl",
    "StableDiffusionXLControlNetPipeline": "stable_diffusion_xl",
}


def backend_pipeline_registry(pipelines_package: str) -> dict[str, str]:
    """``{pipeline class name: "module:Class"}`` for a backend whose pipelines live in ``pipelines_package``."""
    return {name: f"{pipelines_package}.{module}:{name}" for name, module in _BACKEND_PIPELINES.items()}
