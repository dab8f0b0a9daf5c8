"""PyTorch network modules with diffusers' class names, config fields and state-dict keys."""

from backends.torch.models.clip_text import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    CLIPTextWithProjectionOutput,
)
from backends.torch.models.layers import (
    Downsample2D,
    GaussianFourierProjection,
    ResnetBlock2D,
    SpatialSelfAttention,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)
from backends.torch.models.unet_2d import UNet2DModel
from backends.torch.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)
from backends.torch.models.vae import (
    AutoencoderKL,
    Decoder,
    DownEncoderBlock2D,
    Encoder,
    UpDecoderBlock2D,
)
from diffusion_core.models.autoencoder import DiagonalGaussianDistribution

__all__ = [
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
    "Decoder",
    "DiagonalGaussianDistribution",
    "DownBlock2D",
    "DownEncoderBlock2D",
    "Downsample2D",
    "Encoder",
    "GaussianFourierProjection",
    "ResnetBlock2D",
    "ResnetOptions",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DModel",
    "UNetMidBlock2D",
    "UpBlock2D",
    "UpDecoderBlock2D",
    "Upsample2D",
]
