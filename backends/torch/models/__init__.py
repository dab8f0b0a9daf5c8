"""PyTorch network modules with diffusers' class names, config fields and state-dict keys."""

from diffusion_core.models.autoencoder import DiagonalGaussianDistribution
from diffusion_core.torch.models.attention import (
    Attention,
    BasicTransformerBlock,
    FeedForward,
    KAttentionBlock,
    Transformer2DModel,
)
from diffusion_core.torch.models.clip_text import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    CLIPTextWithProjectionOutput,
)
from diffusion_core.torch.models.controlnet import ControlNetModel
from diffusion_core.torch.models.embeddings import AttentionPooling, TextTimeEmbedding
from diffusion_core.torch.models.layers import (
    Downsample2D,
    GaussianFourierProjection,
    ResnetBlock2D,
    SpatialSelfAttention,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)
from diffusion_core.torch.models.multicontrolnet import MultiControlNetModel
from diffusion_core.torch.models.t5 import T5EncoderModel, T5EncoderOutput
from diffusion_core.torch.models.unclip import PriorTransformer, UnCLIPTextProjModel
from diffusion_core.torch.models.unet_2d import UNet2DModel
from diffusion_core.torch.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetOptions,
    UNetMidBlock2D,
    UpBlock2D,
)
from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel
from diffusion_core.torch.models.unet_2d_condition_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    KCrossAttnDownBlock2D,
    KCrossAttnUpBlock2D,
    KDownBlock2D,
    KUpBlock2D,
    UNetMidBlock2DCrossAttn,
)
from diffusion_core.torch.models.unet_2d_simple_blocks import (
    AddedKVAttention,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
)
from diffusion_core.torch.models.vae import (
    AutoencoderKL,
    Decoder,
    DownEncoderBlock2D,
    Encoder,
    UpDecoderBlock2D,
)

__all__ = [
    "AddedKVAttention",
    "Attention",
    "AttentionPooling",
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "AutoencoderKL",
    "BasicTransformerBlock",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPTextWithProjectionOutput",
    "ControlNetModel",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "Decoder",
    "DiagonalGaussianDistribution",
    "DownBlock2D",
    "DownEncoderBlock2D",
    "Downsample2D",
    "Encoder",
    "FeedForward",
    "GaussianFourierProjection",
    "KAttentionBlock",
    "KCrossAttnDownBlock2D",
    "KCrossAttnUpBlock2D",
    "KDownBlock2D",
    "KUpBlock2D",
    "MultiControlNetModel",
    "PriorTransformer",
    "ResnetBlock2D",
    "ResnetOptions",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "SpatialSelfAttention",
    "T5EncoderModel",
    "T5EncoderOutput",
    "TextTimeEmbedding",
    "TimestepEmbedding",
    "Timesteps",
    "Transformer2DModel",
    "UNet2DConditionModel",
    "UNet2DModel",
    "UNetMidBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UNetMidBlock2DSimpleCrossAttn",
    "UnCLIPTextProjModel",
    "UpBlock2D",
    "UpDecoderBlock2D",
    "Upsample2D",
]
