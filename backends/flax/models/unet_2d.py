"""Flax NNX ``UNet2DModel``: the unconditional (optionally class-conditional) UNet of DDPM.

Config fields and attribute names are those of diffusers 0.42.1's ``UNet2DModel``, so
``load_torch_state_dict`` fills it from a diffusers state dict through the one converter in
``diffusion_core.weights.convert``. Call: ``model(sample_nchw, timestep, class_labels=None)``;
NCHW at the boundary, NHWC inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models.layers import (
    GaussianFourierProjection,
    ParamKeys,
    TimestepEmbedding,
    Timesteps,
    conv,
    get_activation,
    group_norm,
)
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.flax.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)
from diffusion_core.models import model_config

DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
UP_BLOCKS: dict[str, type[UpBlock2D]] = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


class UNet2DModel(PretrainedMixin, nnx.Module):
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
        *,
        rngs: nnx.Rngs | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        cfg = {name: value for name, value in locals().items() if name in _CONFIG_FIELDS}
        model_config.validate_unet_2d_config(cfg)
        get_activation(act_fn)
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        self.config = FrozenConfig(cfg)
        self.dtype = dtype
        channels = list(block_out_channels)
        time_dim = time_embedding_dim or channels[0] * 4
        self.conv_in = conv(in_channels, channels[0], 3, rngs, dtype)
        self.time_proj, proj_dim = self._time_projection(cfg, rngs, dtype)
        self.time_embedding = TimestepEmbedding(proj_dim, time_dim, rngs=rngs, dtype=dtype)
        self.class_embedding = self._class_embedding(cfg, proj_dim, time_dim, rngs, dtype)
        opts = ResnetOptions(time_dim, norm_num_groups, norm_eps, act_fn, resnet_time_scale_shift, dropout, dtype)
        self.down_blocks = self._down_blocks(cfg, opts, rngs)
        self.up_blocks = self._up_blocks(cfg, opts, rngs)
        self.mid_block = (
            UNetMidBlock2D(
                channels[-1],
                opts,
                attention_head_dim=attention_head_dim or channels[-1],
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
                output_scale_factor=mid_block_scale_factor,
                rngs=rngs,
            )
            if mid_block_type is not None
            else None
        )
        self.conv_norm_out = group_norm(channels[0], norm_num_groups, norm_eps, rngs, dtype)
        self.conv_out = conv(channels[0], out_channels, 3, rngs, dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> UNet2DModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored.

        ``kwargs`` (``rngs``, ``dtype``) go to the constructor.
        """
        return cls(**model_config.init_kwargs_from_config(config, _CONFIG_FIELDS, "UNet2DModel"), **kwargs)

    @staticmethod
    def _time_projection(cfg: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any) -> tuple[nnx.Module, int]:
        """Timestep -> feature projection and its width."""
        width = cfg["block_out_channels"][0]
        if cfg["time_embedding_type"] == "fourier":
            return GaussianFourierProjection(embedding_size=width, scale=16, rngs=rngs, dtype=dtype), 2 * width
        if cfg["time_embedding_type"] == "learned":
            embed = nnx.Embed(cfg["num_train_timesteps"], width, dtype=dtype, param_dtype=dtype, rngs=rngs)
            return embed, width
        return Timesteps(width, cfg["flip_sin_to_cos"], cfg["freq_shift"]), width

    @staticmethod
    def _class_embedding(
        cfg: Mapping[str, Any], proj_dim: int, time_dim: int, rngs: nnx.Rngs, dtype: Any
    ) -> nnx.Module | None:
        """Class-label embedding added to the time embedding; None for identity or no classes."""
        kind = cfg["class_embed_type"]
        if kind is None and cfg["num_class_embeds"] is not None:
            return nnx.Embed(cfg["num_class_embeds"], time_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        if kind == "timestep":
            return TimestepEmbedding(proj_dim, time_dim, rngs=rngs, dtype=dtype)
        return None

    @staticmethod
    def _down_blocks(cfg: Mapping[str, Any], opts: ResnetOptions, rngs: nnx.Rngs) -> nnx.List:
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
                    rngs=rngs,
                )
            )
        return nnx.List(blocks)

    @staticmethod
    def _up_blocks(cfg: Mapping[str, Any], opts: ResnetOptions, rngs: nnx.Rngs) -> nnx.List:
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
                    rngs=rngs,
                )
            )
        return nnx.List(blocks)

    def __call__(self, sample: jax.Array, timestep: Any, class_labels: jax.Array | None = None) -> jax.Array:
        """Predict the model output for ``sample`` (B, C, H, W) at ``timestep`` (scalar or (B,))."""
        sample = jnp.asarray(sample)
        if sample.ndim != 4:
            raise ValueError(f"sample: expected a (B, C, H, W) array, got shape {tuple(sample.shape)}")
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        timesteps = _batch_timesteps(timestep, sample.shape[0])  # (B,)
        emb = self._embed(timesteps, class_labels)  # (B, time_dim)
        skip = self.conv_in(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))  # (B, H, W, C0)
        sample = skip
        skips: tuple[jax.Array, ...] = (skip,)
        for block in self.down_blocks:
            sample, outputs = block(sample, emb)
            skips += outputs
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            sample, skips = block(sample, skips[-n:], emb), skips[:-n]
        sample = self.conv_out(jax.nn.silu(self.conv_norm_out(sample)))
        if self.config["time_embedding_type"] == "fourier":
            sample = sample / timesteps.reshape(-1, 1, 1, 1)  # sigma-scaled output (score SDE)
        return jnp.transpose(sample, (0, 3, 1, 2))  # (B, C_out, H, W)

    def _embed(self, timesteps: jax.Array, class_labels: jax.Array | None) -> jax.Array:
        """Time embedding plus, for class-conditional models, the class embedding."""
        kind = self.config["class_embed_type"]
        conditional = self.class_embedding is not None or kind == "identity"
        if not conditional and class_labels is not None:
            raise ValueError("class_labels: this model has no class embedding (set num_class_embeds)")
        if conditional and class_labels is None:
            raise ValueError("class_labels: required for a class-conditional model")
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))
        if not conditional:
            return emb
        class_labels = jnp.asarray(class_labels)
        if kind == "timestep":
            class_labels = self.time_proj(class_labels)
        class_emb = class_labels if kind == "identity" else self.class_embedding(class_labels)
        return emb + class_emb.astype(self.dtype)


def _batch_timesteps(timestep: Any, batch: int) -> jax.Array:
    """Broadcast an int, float, 0-d or (B,) timestep to a (B,) array (ints stay ints, floats float32)."""
    timestep = jnp.asarray(timestep)
    if timestep.ndim > 1 or timestep.size not in (1, batch):
        raise ValueError(f"timestep: expected a scalar or a ({batch},) array, got shape {tuple(timestep.shape)}")
    return jnp.broadcast_to(timestep.reshape(-1), (batch,))  # (B,)


_CONFIG_FIELDS = tuple(
    p for p in inspect.signature(UNet2DModel.__init__).parameters if p not in ("self", "rngs", "dtype")
)
