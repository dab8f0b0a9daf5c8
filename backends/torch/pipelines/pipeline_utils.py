"""``DiffusionPipeline`` for PyTorch: the component classes this backend provides and its pipeline registry."""

from __future__ import annotations

import torch

from diffusion_core.pipelines import ComponentClass, PipelineBase
from diffusion_core.pipelines.components import backend_component_table, backend_pipeline_registry
from diffusion_core.torch.lora import TorchLoraLayers

# model_index.json class name -> where the torch class lives (imported only when a pipeline needs it).
TORCH_COMPONENTS: dict[str, ComponentClass] = backend_component_table("diffusion_core.torch.models")

# model_index.json "_class_name" -> pipeline class (DDPM/DDIM here, Stable Diffusion in .stable_diffusion).
TORCH_PIPELINES: dict[str, str] = backend_pipeline_registry("diffusion_core.torch.pipelines")


class DiffusionPipeline(TorchLoraLayers, PipelineBase):
    """Base of the PyTorch pipelines; ``DiffusionPipeline.from_pretrained`` picks the class from the folder.

    LoRA (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...): ``diffusion_core.pipelines.lora``.
    """

    _component_table = TORCH_COMPONENTS
    _pipeline_registry = TORCH_PIPELINES

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {n: c for n, c in self.components.items() if isinstance(c, torch.nn.Module)}

    @property
    def device(self) -> torch.device:
        """The device of the first network component (CPU when there is none)."""
        for module in self._modules().values():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the first network component (float32 when there is none)."""
        for module in self._modules().values():
            for p in module.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        """Move (and optionally cast) every network component; returns ``self``."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        for module in self._modules().values():
            module.to(device=device, dtype=dtype)
        return self
