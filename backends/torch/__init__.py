"""PyTorch backend: diffusion_core's schedulers and pipelines bound to torch modules (CPU, CUDA, MPS)."""

from diffusion_core.torch.models import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusion_core.torch.pipelines import (
    DDIMPipeline,
    DDPMPipeline,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusion_core.torch.sampling import denoise_loop, randn_tensor

__all__ = [
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "ControlNetModel",
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
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "UNet2DConditionModel",
    "UNet2DModel",
    "denoise_loop",
    "randn_tensor",
]
