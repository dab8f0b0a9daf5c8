"""``DiffusionPipeline`` for PyTorch: the component classes this backend provides and its pipeline registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffusion_core.pipelines import ComponentClass, PipelineBase
from diffusion_core.pipelines.components import backend_component_table, backend_pipeline_registry
from diffusion_core.torch import distributed
from diffusion_core.torch.lora import TorchLoraLayers
from diffusion_core.torch.sampling import Generators, randn_tensor

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
    # Whether a call can split its images over torchrun's processes (the DDPM/DDIM and Stable Diffusion flows).
    _splits_over_processes = False
    distributed = False  # set by enable_distributed

    def enable_distributed(self, enabled: bool = True) -> DiffusionPipeline:
        """Split each call's images over the processes of the default ``torch.distributed`` group (torchrun).

        Every process makes the same call; process ``r`` denoises and decodes its contiguous share of the images
        (``diffusion_core.torch.distributed.local_share``) and every process gets the whole batch back, in
        order, equal to one process's. Image ``i`` keeps its noise: drawn from ``generator[i]`` (a list of one
        generator per image), or row ``i`` of the whole batch's draw from one generator. Prompt encoding and the
        start noise run on every process (cheap next to the loop). Without a group it runs as one process.
        Returns ``self``.
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        if enabled and not self._splits_over_processes:
            raise ValueError(
                f"enable_distributed: {type(self).__name__} does not split over processes; the DDPM/DDIM and "
                "Stable Diffusion (SD 1.x/2.x, SDXL, img2img, inpaint, ControlNet, upscale) pipelines do"
            )
        self.distributed = enabled
        return self

    def _splitting(self) -> bool:
        return self.distributed and distributed.world_size() > 1

    def _process_share(self, batch: int) -> slice | None:
        """This process's images ``[start, stop)`` of a call's ``batch``, or None when the call runs whole here."""
        return distributed.local_share(batch) if self._splitting() else None

    def _share_noise(
        self, part: slice | None, shape: Sequence[int], generator: Generators, dtype: torch.dtype
    ) -> Callable[[int], torch.Tensor] | None:
        """The loop's step noise for share ``part``: rows of the whole batch's draw of ``shape``, so each image
        gets the noise it gets in one process; None (the loop draws itself) when the call runs whole."""
        if part is None:
            return None
        return lambda i: randn_tensor(shape, generator, dtype=dtype, device=self.device)[part]

    def _gather_share(self, rows: Any) -> Any:
        """Every process's share of ``rows`` (numpy or a tensor) joined in order; ``rows`` itself when the call
        runs whole."""
        return distributed.all_gather_rows(rows) if self._splitting() else rows

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
