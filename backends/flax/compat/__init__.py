"""diffusers 0.39's Flax API as a thin layer over ``diffusion_core.flax``: change one import line.

    # from diffusers import FlaxStableDiffusionPipeline, FlaxDDIMScheduler
    from diffusion_core.flax.compat import FlaxStableDiffusionPipeline, FlaxDDIMScheduler

Nothing here re-implements a model, scheduler or pipeline: every class wraps the native one.
"""

from diffusion_core.flax.compat.image_pipelines import (
    FlaxStableDiffusionControlNetPipeline,
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
)
from diffusion_core.flax.compat.models import (
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxControlNetModel,
    FlaxUNet2DConditionModel,
)
from diffusion_core.flax.compat.pipelines import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionPipeline,
    FlaxStableDiffusionPipelineOutput,
)
from diffusion_core.flax.compat.schedulers import (
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxLMSDiscreteScheduler,
    FlaxPNDMScheduler,
    FlaxSchedulerOutput,
    FlaxSchedulerState,
)

__all__ = [
    "FlaxAutoencoderKL",
    "FlaxCLIPTextModel",
    "FlaxControlNetModel",
    "FlaxUNet2DConditionModel",
    "FlaxDiffusionPipeline",
    "FlaxStableDiffusionControlNetPipeline",
    "FlaxStableDiffusionImg2ImgPipeline",
    "FlaxStableDiffusionInpaintPipeline",
    "FlaxStableDiffusionPipeline",
    "FlaxStableDiffusionPipelineOutput",
    "FlaxDDIMScheduler",
    "FlaxDDPMScheduler",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxEulerDiscreteScheduler",
    "FlaxLMSDiscreteScheduler",
    "FlaxPNDMScheduler",
    "FlaxSchedulerOutput",
    "FlaxSchedulerState",
]
