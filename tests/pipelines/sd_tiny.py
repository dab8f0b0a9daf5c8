"""Tiny random-weight diffusers Stable Diffusion pipelines (real CLIP vocabulary) saved to disk, for parity tests.

Shared by the torch and flax SD pipeline tests: ``save_sd_pipeline(folder, kind)`` writes a diffusers
pipeline folder (``model_index.json`` + components) that both diffusers and our loaders read.
Configs are diffusers' fast-test ones (tests/pipelines/stable_diffusion/*), with a text encoder sized for
CLIP's real 49408-token vocabulary so prompts tokenize exactly as with a Hub checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

from diffusion_core import schedulers
from tests.pipelines import tiny
from tests.tokenizer_fixtures import write_clip_vocab

PROMPT = "A painting of a squirrel eating a burger"
NEGATIVE = "blurry, low quality"
MAX_LENGTH = 77  # CLIP's model_max_length

# UNet2DConditionModel of diffusers' SD fast tests; in_channels per pipeline kind below.
SD_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=32,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=8,
    norm_num_groups=2,
)
SD_VAE = dict(
    block_out_channels=(4, 8),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=2,
)
# CLIP's special ids in the real vocabulary: <|startoftext|> 49406, <|endoftext|> 49407 (also the SD1 pad).
SD_TEXT = dict(
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_size=8,
    intermediate_size=16,
    layer_norm_eps=1e-05,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_size=49408,
    max_position_embeddings=MAX_LENGTH,
)
UNET_IN_CHANNELS = {
    "StableDiffusionPipeline": 4,
    "StableDiffusionImg2ImgPipeline": 4,
    "StableDiffusionInpaintPipeline": 9,
    "StableDiffusionInstructPix2PixPipeline": 8,
    "StableDiffusionControlNetPipeline": 4,
    "StableDiffusionUpscalePipeline": 7,
}
# ControlNet matching SD_UNET's down path (its residuals feed those skips); the conditioning embedding
# downsamples by 2 like the tiny VAE.
SD_CONTROLNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    in_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    cross_attention_dim=8,
    conditioning_embedding_out_channels=(16, 32),
    norm_num_groups=2,
)
# The x2 latent upscaler's K-diffusion UNet (diffusers' test config, text width 8): fourier time embedding,
# timestep_cond = [ones(64), zeros(64), pooled text (8)], out_channels = latents + 1.
LATENT_UPSCALE_UNET = dict(
    act_fn="gelu",
    attention_head_dim=8,
    norm_num_groups=None,
    block_out_channels=(32, 32, 64, 64),
    time_cond_proj_dim=128 + 8,
    conv_in_kernel=1,
    conv_out_kernel=1,
    cross_attention_dim=8,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    in_channels=8,
    mid_block_type=None,
    only_cross_attention=False,
    out_channels=5,
    resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier",
    timestep_post_act="gelu",
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
)
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@functools.lru_cache(maxsize=1)
def _vocab_folder() -> Path:
    """CLIP's vocabulary files, written once per process to a temporary folder removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="clip_vocab_"))
    atexit.register(shutil.rmtree, folder, True)
    return write_clip_vocab(folder)


def clip_tokenizer() -> transformers.CLIPTokenizer:
    """transformers' CLIPTokenizer over the real CLIP vocabulary (what SD checkpoints ship)."""
    return transformers.CLIPTokenizer.from_pretrained(_vocab_folder(), model_max_length=MAX_LENGTH)


def _nonzero(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """ControlNet's zero-initialised convolutions get small random weights, so its residuals matter in tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def sd_components(kind: str = "StableDiffusionPipeline", unet_in_channels: int | None = None) -> dict:
    """Seeded random SD components (``torch.manual_seed(0)`` before each model, as diffusers' tests)."""
    in_channels = unet_in_channels or UNET_IN_CHANNELS.get(kind, 4)
    unet_config = {**SD_UNET, "in_channels": in_channels}
    if kind == "StableDiffusionUpscalePipeline":
        unet_config["num_class_embeds"] = 100
    if kind == "StableDiffusionLatentUpscalePipeline":
        unet_config = LATENT_UPSCALE_UNET
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**SD_VAE).eval()
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD_TEXT)).eval()
    extra = {}
    if kind == "StableDiffusionControlNetPipeline":
        extra["controlnet"] = random_controlnet(0)
    return dict(
        **extra,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def random_controlnet(seed: int) -> diffusers.ControlNetModel:
    """A tiny diffusers ControlNet, every parameter random (its zero-initialised ones too), from ``seed``."""
    torch.manual_seed(seed)
    return _nonzero(diffusers.ControlNetModel(**SD_CONTROLNET).eval(), seed + 1)


def save_multi_controlnet_pipeline(
    folder: Path, nets: int = 2, kind: str = "StableDiffusionControlNetPipeline", unet_in_channels: int = 4
) -> Path:
    """A tiny diffusers ControlNet pipeline of ``kind`` with ``nets`` different random ControlNets (one: a plain
    ``ControlNetModel``), saved by diffusers (``controlnet/``, ``controlnet_1/``, ...; ``MultiControlNetModel`` in
    model_index.json)."""
    components = sd_components("StableDiffusionControlNetPipeline", unet_in_channels)
    components["controlnet"] = [random_controlnet(seed) for seed in range(nets)] if nets > 1 else random_controlnet(0)
    getattr(diffusers, kind)(**components, requires_safety_checker=False).save_pretrained(folder)
    return folder


def diffusers_sd_pipeline(kind: str = "StableDiffusionPipeline", **kwargs):
    """A diffusers SD pipeline of ``kind`` with seeded tiny components, progress bar off."""
    components = sd_components(kind, **kwargs)
    if kind == "StableDiffusionUpscalePipeline":  # x4 upscaler: DDPM noises the low-res image, v-prediction
        del components["image_encoder"]
        components.update(
            low_res_scheduler=diffusers.DDPMScheduler(),
            scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction"),
            watermarker=None,
            max_noise_level=350,
        )
    elif kind == "StableDiffusionLatentUpscalePipeline":  # x2: Euler on the denoised sample, no optional parts
        for name in ("safety_checker", "feature_extractor", "image_encoder"):
            del components[name]
        components["scheduler"] = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="sample"
        )
    else:
        components["requires_safety_checker"] = False
    pipe = getattr(diffusers, kind)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd_pipeline(folder: Path, kind: str = "StableDiffusionPipeline", **kwargs) -> Path:
    """Write a tiny diffusers SD pipeline of ``kind`` to ``folder`` (diffusers' save_pretrained layout)."""
    diffusers_sd_pipeline(kind, **kwargs).save_pretrained(folder)
    return folder


def load_diffusers(folder: Path, scheduler: str | None = None):
    """The saved pipeline loaded back with diffusers (the oracle), optionally with another scheduler class."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_latents(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A fixed float32 Gaussian start draw (what ``latents=`` takes in both backends)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def sample_image(height: int = 32, width: int = 32, seed: int = 1) -> np.ndarray:
    """A (1, H, W, 3) float32 image in [0, 1] (img2img / inpaint / pix2pix inputs)."""
    return np.random.default_rng(seed).random((1, height, width, 3)).astype(np.float32)


def sample_mask(height: int = 32, width: int = 32) -> np.ndarray:
    """A (1, H, W, 1) float32 mask: 1 (repaint) in the lower-right quarter, 0 elsewhere."""
    mask = np.zeros((1, height, width, 1), np.float32)
    mask[:, height // 2 :, width // 2 :] = 1.0
    return mask


def swap_schedulers(ours_pipe, ref_pipe, name: str):
    """Both pipelines switched to scheduler ``name`` (same config); returns a restore function."""
    old_ours, old_ref = ours_pipe.scheduler, ref_pipe.scheduler
    ours_pipe.scheduler = schedulers.from_config(tiny.swap_config(old_ours, name))
    ref_pipe.scheduler = getattr(diffusers, name).from_config(old_ref.config)

    def restore():
        ours_pipe.scheduler, ref_pipe.scheduler = old_ours, old_ref

    return restore
