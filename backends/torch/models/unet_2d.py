"""PyTorch ``UNet2DModel``: the unconditional (optionally class-conditional) UNet of DDPM.

Config fields, module names and state-dict keys are those of diffusers 0.42.1's
``UNet2DModel``, so a diffusers state dict loads with ``load_state_dict(strict=True)``.
Call: ``model(sample_nchw, timestep, class_labels=None) -> tensor`` (NCHW).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import model_config
from diffusion_core.torch.models.layers import (
    GaussianFourierProjection,
    TimestepEmbedding,
    Timesteps,
    get_activation,
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

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        super().__init__()
        cfg = {name: value for name, value in locals().items() if name in _CONFIG_FIELDS}
        model_config.validate_unet_2d_config(cfg)
        get_activation(act_fn)
        self.config = FrozenConfig(cfg)
        self.sample_size = sample_size
        channels = list(block_out_channels)
        time_dim = time_embedding_dim or channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj, proj_dim = self._time_projection(cfg)
        self.time_embedding = TimestepEmbedding(proj_dim, time_dim)
        self.class_embedding = self._class_embedding(cfg, proj_dim, time_dim)
        opts = ResnetOptions(time_dim, norm_num_groups, norm_eps, act_fn, resnet_time_scale_shift, dropout)
        self.down_blocks = self._down_blocks(cfg, opts)
        self.up_blocks = self._up_blocks(cfg, opts)  # before mid_block: diffusers' state-dict order
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                opts,
                attention_head_dim=attention_head_dim or channels[-1],
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
                output_scale_factor=mid_block_scale_factor,
            )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNet2DModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**model_config.init_kwargs_from_config(config, _CONFIG_FIELDS, "UNet2DModel"))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @staticmethod
    def _time_projection(cfg: Mapping[str, Any]) -> tuple[nn.Module, int]:
        """Timestep -> feature projection and its width."""
        width = cfg["block_out_channels"][0]
        if cfg["time_embedding_type"] == "fourier":
            return GaussianFourierProjection(embedding_size=width, scale=16), 2 * width
        if cfg["time_embedding_type"] == "learned":
            return nn.Embedding(cfg["num_train_timesteps"], width), width
        return Timesteps(width, cfg["flip_sin_to_cos"], cfg["freq_shift"]), width

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

    @staticmethod
    def _down_blocks(cfg: Mapping[str, Any], opts: ResnetOptions) -> nn.ModuleList:
        channels = list(cfg["block_out_channels"])
        blocks = []
        for i, name in enumerate(cfg["down_block_types"]):
            block_cls = DOWN_BLOCKS[model_config.block_name(name)]
            blocks.append(
                block_cls(
                    channels[max(i - 1, 0)],
                    channels[i],
                    opts,
                    num_layers=cfg["layers_per_block"],
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=cfg["downsample_padding"],
                    downsample_type=cfg["downsample_type"] if block_cls.has_attention else "conv",
                    attention_head_dim=cfg["attention_head_dim"] or channels[i],
                )
            )
        return nn.ModuleList(blocks)

    @staticmethod
    def _up_blocks(cfg: Mapping[str, Any], opts: ResnetOptions) -> nn.ModuleList:
        rev = list(reversed(cfg["block_out_channels"]))
        blocks = []
        for i, name in enumerate(cfg["up_block_types"]):
            block_cls = UP_BLOCKS[model_config.block_name(name)]
            blocks.append(
                block_cls(
                    rev[min(i + 1, len(rev) - 1)],
                    rev[max(i - 1, 0)],
                    rev[i],
                    opts,
                    num_layers=cfg["layers_per_block"] + 1,
                    add_upsample=i < len(rev) - 1,
                    upsample_type=cfg["upsample_type"] if block_cls.has_attention else "conv",
                    attention_head_dim=cfg["attention_head_dim"] or rev[i],
                )
            )
        return nn.ModuleList(blocks)

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


_CONFIG_FIELDS = tuple(p for p in inspect.signature(UNet2DModel.__init__).parameters if p != "self")
