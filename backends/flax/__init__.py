"""JAX/Flax backend: diffusion_core's schedulers and pipelines as compiled programs (``lax.scan``, pmap, meshes)."""

from diffusion_core.flax.compilation import enable_compilation_cache
from diffusion_core.flax.distributed import initialize_distributed
from diffusion_core.flax.models import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusion_core.flax.pipelines import (
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
from diffusion_core.flax.sampling import denoise_loop, jit_denoise_loop

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
    "enable_compilation_cache",
    "initialize_distributed",
    "jit_denoise_loop",
]
