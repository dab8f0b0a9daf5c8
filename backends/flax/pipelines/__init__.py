"""Flax NNX pipelines: ``DiffusionPipeline.from_pretrained`` plus the concrete pipeline classes."""

from diffusion_core.flax.pipelines.ddpm import DDIMPipeline, DDPMPipeline
from diffusion_core.flax.pipelines.deepfloyd_if import (
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    IFInpaintingPipeline,
    IFInpaintingSuperResolutionPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
)
from diffusion_core.flax.pipelines.pipeline_utils import FLAX_COMPONENTS, FLAX_PIPELINES, DiffusionPipeline
from diffusion_core.flax.pipelines.stable_diffusion import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from diffusion_core.flax.pipelines.stable_diffusion_xl import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusion_core.flax.pipelines.unclip import UnCLIPPipeline

__all__ = [
    "FLAX_COMPONENTS",
    "FLAX_PIPELINES",
    "DDIMPipeline",
    "DDPMPipeline",
    "DiffusionPipeline",
    "IFImg2ImgPipeline",
    "IFImg2ImgSuperResolutionPipeline",
    "IFInpaintingPipeline",
    "IFInpaintingSuperResolutionPipeline",
    "IFPipeline",
    "IFSuperResolutionPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "UnCLIPPipeline",
]
