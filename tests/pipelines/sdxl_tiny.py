"""Tiny random-weight diffusers SDXL pipelines (base and refiner, real CLIP vocabulary) saved to disk.

Configs follow diffusers' SDXL fast tests (tests/pipelines/stable_diffusion_xl): two CLIP encoders of width 32
(the second with a 32-wide projection), a UNet with the ``text_time`` addition embedding over 6 size/crop ids
(refiner: 5 ids, the last an aesthetic score) and the SD tests' tiny VAE.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from tests.pipelines import sd_tiny

TEXT = {**sd_tiny.SD_TEXT, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "projection_dim": 32}
TIME_DIM = 8


def unet_config(refiner: bool, in_channels: int = 4) -> dict:
    """The UNet of the base (cross-attention over both encoders, 64) or refiner (the second only, 32)."""
    ids, context = (5, 32) if refiner else (6, 64)
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=ids * TIME_DIM + TEXT["projection_dim"],
        cross_attention_dim=context,
        norm_num_groups=1,
    )


SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
)


def clip_tokenizer_2() -> transformers.CLIPTokenizer:
    """SDXL's second tokenizer: CLIP's vocabulary padded with "!" (id 0) instead of <|endoftext|>."""
    return transformers.CLIPTokenizer.from_pretrained(sd_tiny._vocab_folder(), model_max_length=77, pad_token="!")


def sdxl_components(refiner: bool = False, in_channels: int = 4) -> dict:
    """Seeded random SDXL components (``torch.manual_seed(0)`` before each model, as diffusers' tests)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**unet_config(refiner, in_channels)).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**sd_tiny.SD_VAE).eval()
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval()
    torch.manual_seed(1)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)).eval()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=None if refiner else text_encoder,
        tokenizer=None if refiner else sd_tiny.clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer_2(),
        scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER),
    )


def save_sdxl_pipeline(folder: Path, refiner: bool = False, force_zeros: bool = True) -> Path:
    """Write the tiny base (``StableDiffusionXLPipeline``) or refiner (``StableDiffusionXLImg2ImgPipeline`` with
    ``requires_aesthetics_score``) to ``folder`` with diffusers' ``save_pretrained``."""
    components = sdxl_components(refiner)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            **components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=force_zeros
        )
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(folder)
    return folder


def save_sdxl_inpaint_pipeline(folder: Path, in_channels: int = 4) -> Path:
    """Write a tiny ``StableDiffusionXLInpaintPipeline`` (a 4-channel UNet blends, a 9-channel one takes the mask
    and masked-image latents) to ``folder``."""
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**sdxl_components(False, in_channels))
    pipe.save_pretrained(folder)
    return folder


SDXL_CONTROLNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    in_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    conditioning_embedding_out_channels=(16, 32),  # one stride-2 conv: the control image at pixel size
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * TIME_DIM + TEXT["projection_dim"],
    cross_attention_dim=64,
)


def save_sdxl_controlnet_pipeline(folder: Path, nets: int = 1) -> Path:
    """Write a tiny ``StableDiffusionXLControlNetPipeline`` (its zero convs given small random weights); with
    ``nets`` > 1, that many different ControlNets (diffusers' ``controlnet/``, ``controlnet_1/``, ... layout)."""
    controlnets = []
    for seed in range(nets):
        torch.manual_seed(seed)
        controlnets.append(sd_tiny._nonzero(diffusers.ControlNetModel(**SDXL_CONTROLNET).eval(), seed + 1))
    controlnet = controlnets[0] if nets == 1 else controlnets
    pipe = diffusers.StableDiffusionXLControlNetPipeline(**sdxl_components(), controlnet=controlnet)
    pipe.save_pretrained(folder)
    return folder
