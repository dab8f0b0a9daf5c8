"""Tiny DeepFloyd IF pipelines (stage I and II) built with diffusers 0.42.1, random UNets, saved to disk.

No text encoder: the tests pass ``prompt_embeds`` / ``negative_prompt_embeds`` (diffusers accepts those
without a T5). The UNets are diffusers' IF fast-test configs with every parameter random (small scale, so
the thresholded images are not saturated).
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import torch

from tests.torch_models.test_unet_2d_condition_if import IF_STAGE_I, IF_STAGE_II

# the published IF schedulers (scheduler/ and image_noising_scheduler/ of DeepFloyd/IF-I-XL-v1.0 / IF-II-L-v1.0)
IF_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
    variance_type="learned_range",
)  # fmt: skip
IF_NOISING_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02
)
TEXT = (7, 32)  # (tokens, width) of the given T5 embeddings: the UNets' encoder_hid_dim
STAGE_I = "IFPipeline"
STAGE_II = "IFSuperResolutionPipeline"
IMG2IMG = "IFImg2ImgPipeline"  # stage I's UNet
INPAINT = "IFInpaintingPipeline"  # stage I's UNet
IMG2IMG_SR = "IFImg2ImgSuperResolutionPipeline"  # stage II's UNet
INPAINT_SR = "IFInpaintingSuperResolutionPipeline"  # stage II's UNet
ALL = (STAGE_I, STAGE_II, IMG2IMG, INPAINT, IMG2IMG_SR, INPAINT_SR)


def random_unet(config: dict, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return unet


def diffusers_if(kind: str):
    """The diffusers pipeline of ``kind`` (no text encoder, safety checker or watermarker)."""
    parts = dict(
        tokenizer=None, text_encoder=None, scheduler=diffusers.DDPMScheduler(**IF_SCHEDULER), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )  # fmt: skip
    if kind in (STAGE_I, IMG2IMG, INPAINT):
        pipe = getattr(diffusers, kind)(unet=random_unet(IF_STAGE_I), **parts)
    else:
        noising = diffusers.DDPMScheduler(**IF_NOISING_SCHEDULER)
        pipe = getattr(diffusers, kind)(unet=random_unet(IF_STAGE_II), image_noising_scheduler=noising, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_if_pipeline(folder: Path, kind: str) -> Path:
    diffusers_if(kind).save_pretrained(folder)
    return folder


def text_embeds(batch: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds, negative_prompt_embeds), each (batch, *TEXT) float32."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, *TEXT)).astype(np.float32) for _ in range(2))


def low_res_images(batch: int, size: int = 8, seed: int = 4) -> np.ndarray:
    """(batch, 3, size, size) float32 stage-I images in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def unsaturated(images: np.ndarray) -> float:
    """Fraction of pixels strictly inside (0, 1): guards against a degenerate (clipped) reference."""
    return float(((images > 0.01) & (images < 0.99)).mean())


def mask(size: int = 16) -> np.ndarray:
    """(size, size) float32 in [0, 1]: a redrawn square in the middle, values near the 0.5 threshold around it."""
    m = np.full((size, size), 0.3, np.float32)
    m[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0.7
    return m


class WordTokenizer:
    """A stand-in for IF's T5 tokenizer (the real one needs a sentencepiece model): one id per word, then EOS (1),
    padded with 0; answers the keyword arguments diffusers' and our IF encode_prompt pass."""

    model_max_length = 77

    def __call__(self, texts, padding="longest", max_length=None, truncation=False, return_tensors="np", **_):
        from transformers import BatchEncoding

        ids = [
            [2 + sum(map(ord, w)) % 40 for w in t.split()] + [1] for t in ([texts] if isinstance(texts, str) else texts)
        ]
        ids = [i[: max_length - 1] + [1] if truncation and len(i) > max_length else i for i in ids]
        length = max_length if padding == "max_length" else max(map(len, ids))
        mask = [[1] * len(i) + [0] * (length - len(i)) for i in ids]
        ids = [i + [0] * (length - len(i)) for i in ids]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)


def tiny_t5() -> torch.nn.Module:
    """A random transformers T5EncoderModel whose width is the UNets' encoder_hid_dim."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=TEXT[1], d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config).eval()
