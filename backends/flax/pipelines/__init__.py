"""Flax NNX pipelines: ``DiffusionPipeline.from_pretrained`` plus the concrete pipeline classes."""

from backends.flax.pipelines.ddpm import DDIMPipeline, DDPMPipeline
from backends.flax.pipelines.pipeline_utils import FLAX_COMPONENTS, FLAX_PIPELINES, DiffusionPipeline
from backends.flax.pipelines.stable_diffusion import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)

__all__ = [
    "FLAX_COMPONENTS",
    "FLAX_PIPELINES",
    "DDIMPipeline",
    "DDPMPipeline",
    "DiffusionPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
]
