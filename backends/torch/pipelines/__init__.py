"""PyTorch pipelines: ``DiffusionPipeline.from_pretrained`` plus the concrete pipeline classes."""

from backends.torch.pipelines.ddpm import DDIMPipeline, DDPMPipeline
from backends.torch.pipelines.pipeline_utils import TORCH_COMPONENTS, TORCH_PIPELINES, DiffusionPipeline

__all__ = ["TORCH_COMPONENTS", "TORCH_PIPELINES", "DDIMPipeline", "DDPMPipeline", "DiffusionPipeline"]
