"""PyTorch ``UNet2DModel``: the unconditional (optionally class-conditional) UNet of DDPM.

Config fields, module names and state-dict keys are those of diffusers 0.42.1's
``UNet2DModel``, so a diffusers state dict loads with ``load_state_dict(strict=True)``.
Call: ``model(sample_nchw, timestep, class_labels=None) -> tensor`` (NCHW).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import model_config, unet_2d_config
from diffusion_core.torch.models.layers import (
    GaussianFourierProjection,
    TimestepEmbedding,
    Timesteps,
)
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.torch.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)

DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
UP_BLOCKS: dict[str, type[UpBlock2D]] = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


class UNet2DModel(PretrainedMixin, nn.Module):
    """Unconditional 2D UNet (Ho et al. 2020) with diffusers' config and parameter names."""

    def __init__(self, **config: Any) -> None:
        """Keyword arguments: diffusers' ``UNet2DModel`` config fields (``unet_2d_config.UNET_2D_DEFAULTS``)."""
        super().__init__()
        cfg = model_config.resolve_config(config, unet_2d_config.UNET_2D_DEFAULTS, "UNet2DModel")
        model_config.validate_unet_2d_config(cfg)
        self.config = FrozenConfig(cfg)
        self.sample_size = cfg["sample_size"]
        channels = list(cfg["block_out_channels"])
        proj_dim, time_dim = unet_2d_config.unet_2d_time_dims(cfg)
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel_size=3, padding=1)
        self.time_proj = self._time_projection(cfg)
        self.time_embedding = TimestepEmbedding(proj_dim, time_dim)
        self.class_embedding = self._class_embedding(cfg, proj_dim, time_dim)
        opts = ResnetOptions(
            time_dim,
            cfg["norm_num_groups"],
            cfg["norm_eps"],
            cfg["act_fn"],
            cfg["resnet_time_scale_shift"],
            cfg["dropout"],
        )
        down, up = unet_2d_config.unet_2d_down_blocks(cfg), unet_2d_config.unet_2d_up_blocks(cfg)
        self.down_blocks = nn.ModuleList(DOWN_BLOCKS[kind](opts=opts, **kwargs) for kind, kwargs in down)
        self.up_blocks = nn.ModuleList(UP_BLOCKS[kind](opts=opts, **kwargs) for kind, kwargs in up)  # before mid
        mid = unet_2d_config.unet_2d_mid_block(cfg)
        self.mid_block = None if mid is None else UNetMidBlock2D(channels[-1], opts, **mid)
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"])
        self.conv_act = nn.SiLU()  # diffusers' fixed output activation, whatever act_fn
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNet2DModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        fields = unet_2d_config.UNET_2D_DEFAULTS
        return cls(**model_config.init_kwargs_from_config(config, fields, "UNet2DModel"))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @staticmethod
    def _time_projection(cfg: Mapping[str, Any]) -> nn.Module:
        """Timestep -> feature projection (``unet_2d_time_dims`` gives its width)."""
        width = cfg["block_out_channels"][0]
        if cfg["time_embedding_type"] == "fourier":
            return GaussianFourierProjection(embedding_size=width, scale=16)
        if cfg["time_embedding_type"] == "learned":
            return nn.Embedding(cfg["num_train_timesteps"], width)
        return Timesteps(width, cfg["flip_sin_to_cos"], cfg["freq_shift"])

    @staticmethod
    def _class_embedding(cfg: Mapping[str, Any], proj_dim: int, time_dim: int) -> nn.Module | None:
        """Class-label embedding added to the time embedding, or None."""
        kind = cfg["class_embed_type"]
        if kind is None and cfg["num_class_embeds"] is not None:
            return nn.Embedding(cfg["num_class_embeds"], time_dim)
        if kind == "timestep":
            return TimestepEmbedding(proj_dim, time_dim)
        if kind == "identity":
            return nn.Identity()
        return None

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the model output for ``sample`` (B, C, H, W) at ``timestep`` (scalar or (B,))."""
        if sample.ndim != 4:
            raise ValueError(f"sample: expected a (B, C, H, W) tensor, got shape {tuple(sample.shape)}")
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        timesteps = _batch_timesteps(timestep, sample.shape[0], sample.device)  # (B,)
        emb = self._embed(timesteps, class_labels)  # (B, time_dim)
        skip = self.conv_in(sample)
        sample = skip
        skips: tuple[torch.Tensor, ...] = (skip,)
        for block in self.down_blocks:
            sample, outputs = block(sample, emb)
            skips += outputs
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            sample, skips = block(sample, skips[-n:], emb), skips[:-n]
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if self.config["time_embedding_type"] == "fourier":
            sample = sample / timesteps.reshape(-1, 1, 1, 1)  # sigma-scaled output (score SDE)
        return sample

    def _embed(self, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Time embedding plus, for class-conditional models, the class embedding."""
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels: this model has no class embedding (set num_class_embeds)")
            return emb
        if class_labels is None:
            raise ValueError("class_labels: required for a class-conditional model")
        if self.config["class_embed_type"] == "timestep":
            class_labels = self.time_proj(class_labels)
        return emb + self.class_embedding(class_labels).to(self.dtype)


def _batch_timesteps(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast an int, float, 0-d or (B,) timestep to a (B,) tensor on ``device``.

    Python ints become int64 and floats float32 (diffusers truncates Python floats to int64).
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor(timestep, device=device)
        if timestep.is_floating_point():
            timestep = timestep.float()
    timestep = timestep.to(device)
    if timestep.ndim > 1 or timestep.numel() not in (1, batch):
        raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, got shape {tuple(timestep.shape)}")
    return timestep.reshape(-1).expand(batch)  # (B,)
