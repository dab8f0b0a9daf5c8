"""Pipelines, framework-neutral half: folders and ``model_index.json``, component loading, image utils,
and every pipeline defined once: its validated request and recipe (``sd_recipe``, ``sd_recipes``,
``unconditional``) over the shared math (guidance, img2img strength, inpaint masks, upscaler conditioning).

Backends (``diffusion_core.torch.pipelines``, ``diffusion_core.flax.pipelines``) bind it to their networks,
RNG and loop driver.
"""

from diffusion_core.pipelines import conditioning, guidance, image
from diffusion_core.pipelines.base import ImagePipelineOutput, PipelineBase
from diffusion_core.pipelines.components import ComponentClass, canonical_class_name, lookup_component_class
from diffusion_core.pipelines.hub import pipeline_allow_patterns, resolve_pipeline_folder
from diffusion_core.pipelines.model_index import (
    MODEL_INDEX_NAME,
    ComponentSpec,
    ModelIndex,
    parse_model_index,
    read_model_index,
    write_model_index,
)

__all__ = [
    "MODEL_INDEX_NAME",
    "ComponentClass",
    "ComponentSpec",
    "ImagePipelineOutput",
    "ModelIndex",
    "PipelineBase",
    "canonical_class_name",
    "conditioning",
    "guidance",
    "image",
    "lookup_component_class",
    "parse_model_index",
    "pipeline_allow_patterns",
    "read_model_index",
    "resolve_pipeline_folder",
    "write_model_index",
]
