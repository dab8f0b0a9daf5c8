"""PyTorch ``MultiControlNetModel``: several ControlNets steering one UNet, diffusers' class and folder layout.

The layout (``controlnet/``, ``controlnet_1/``, ...) and the sum of the residuals are
``diffusion_core.models.multicontrolnet``; this module holds the nets and calls each with its own image and scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_core.models import multicontrolnet as mcn
from diffusion_core.torch.models.controlnet import ControlNetModel
from diffusion_core.weights import DEFAULT_MAX_SHARD_SIZE


class MultiControlNetModel(nn.Module):
    """``nets``: the ControlNets, in the order their images and scales are given."""

    def __init__(self, controlnets: Sequence[ControlNetModel]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(mcn.check_controlnets(controlnets, ControlNetModel))

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        **kwargs: Any,
    ) -> MultiControlNetModel:
        """Load ``<path>[/subfolder]``, ``..._1``, ``..._2``, ... (a local folder; ``kwargs`` go to each
        ``ControlNetModel.from_pretrained``)."""
        folders = mcn.controlnet_folders(path_or_repo_id, subfolder)
        return cls([ControlNetModel.from_pretrained(f, dtype=dtype, variant=variant, **kwargs) for f in folders])

    def save_pretrained(
        self, folder: str | os.PathLike, variant: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> list[Path]:
        """Net 0 into ``folder``, net i into ``<folder>_i`` beside it (what diffusers writes and reads)."""
        paths: list[Path] = []
        for i, net in enumerate(self.nets):
            paths += net.save_pretrained(mcn.sibling_folder(folder, i), variant=variant, max_shard_size=max_shard_size)
        return paths

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        conditioning_scale: Sequence[float | torch.Tensor],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        guess_mode: bool = False,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The summed residuals of every net: net i sees ``controlnet_cond[i]`` scaled by ``conditioning_scale[i]``;
        every net gets the same ``added_cond_kwargs`` (SDXL)."""
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(
                f"controlnet_cond, conditioning_scale: one entry per ControlNet ({len(self.nets)}), got "
                f"{len(controlnet_cond)} and {len(conditioning_scale)}"
            )
        outputs = [
            net(sample, timestep, encoder_hidden_states, image, scale, class_labels, timestep_cond, attention_mask,
                guess_mode, added_cond_kwargs)
            for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale, strict=True)
        ]  # fmt: skip
        return mcn.sum_residuals(outputs)
