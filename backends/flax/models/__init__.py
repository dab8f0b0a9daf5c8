"""Flax NNX network modules with diffusers' class names, config fields and parameter names."""

from backends.flax.models.clip_text import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    CLIPTextWithProjectionOutput,
)
from backends.flax.models.layers import (
    Downsample2D,
    FrozenWeight,
    GaussianFourierProjection,
    ResnetBlock2D,
    SpatialSelfAttention,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)
from backends.flax.models.loading import flax_state_to_torch, load_torch_state_dict, weight_shapes
from backends.flax.models.unet_2d import UNet2DModel
from backends.flax.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)
from backends.flax.models.vae import AutoencoderKL, Decoder, DownEncoderBlock2D, Encoder, UpDecoderBlock2D

__all__ = [
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
    "Decoder",
    "DownBlock2D",
    "DownEncoderBlock2D",
    "Downsample2D",
    "Encoder",
    "FrozenWeight",
    "GaussianFourierProjection",
    "ResnetBlock2D",
    "ResnetOptions",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DModel",
    "UNetMidBlock2D",
    "UpDecoderBlock2D",
    "UpBlock2D",
    "Upsample2D",
    "flax_state_to_torch",
    "load_torch_state_dict",
    "weight_shapes",
]
