"""A tiny random-weight diffusers ``UnCLIPPipeline`` (real CLIP vocabulary) saved to disk, for parity tests.

The configs are diffusers' unCLIP fast-test ones (tests/pipelines/unclip/test_unclip.py), with a text
encoder sized for CLIP's real vocabulary and every parameter random (zero-initialised ones included).
"""

from __future__ import annotations

import functools
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

from tests.pipelines.sd_tiny import SD_TEXT, clip_tokenizer

PROMPT = "A painting of a squirrel eating a burger"
TEXT = {**SD_TEXT, "hidden_size": 32, "projection_dim": 32, "intermediate_size": 37, "num_attention_heads": 4}
PRIOR = dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)
TEXT_PROJ = dict(clip_embeddings_dim=32, time_embed_dim=128, cross_attention_dim=100)
DECODER = dict(
    sample_size=32,
    in_channels=3,
    out_channels=6,  # eps and the learned-range variance weight
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=100,
    attention_head_dim=4,
    resnet_time_scale_shift="scale_shift",
    class_embed_type="identity",
)
SUPER_RES = dict(
    sample_size=64,
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(32, 64),
    in_channels=6,
    out_channels=3,
    norm_num_groups=8,
)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (the prior's positional table, prd token and clip statistics start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def components() -> dict:
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)).eval()
    prior = randomise(diffusers.PriorTransformer(**PRIOR), 1)
    prior.clip_std.data.abs_().add_(0.5)  # a positive scale for the embedding statistics
    return dict(
        prior=prior,
        decoder=randomise(diffusers.UNet2DConditionModel(**DECODER), 2),
        text_proj=randomise(UnCLIPTextProjModel(**TEXT_PROJ), 3),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        super_res_first=randomise(diffusers.UNet2DModel(**SUPER_RES), 4),
        super_res_last=randomise(diffusers.UNet2DModel(**SUPER_RES), 5),
        prior_scheduler=diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )


def diffusers_pipeline():
    pipe = diffusers.UnCLIPPipeline(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=1)
def _saved(folder: str) -> str:
    diffusers_pipeline().save_pretrained(folder)
    return folder


def save_unclip_pipeline(folder: Path) -> Path:
    diffusers_pipeline().save_pretrained(folder)
    return folder


CALL = dict(prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2)


def load_diffusers(folder: Path):
    """The saved pipeline loaded back with diffusers, component by component: diffusers 0.42's
    ``UnCLIPPipeline.from_pretrained`` cannot resolve its own ``["diffusers", "UnCLIPTextProjModel"]`` entry
    (the class moved to a deprecated package), so the pipeline is assembled from its loaded parts."""
    load = {
        "prior": diffusers.PriorTransformer,
        "decoder": diffusers.UNet2DConditionModel,
        "text_proj": UnCLIPTextProjModel,
        "text_encoder": transformers.CLIPTextModelWithProjection,
        "tokenizer": transformers.CLIPTokenizer,
        "super_res_first": diffusers.UNet2DModel,
        "super_res_last": diffusers.UNet2DModel,
        "prior_scheduler": diffusers.UnCLIPScheduler,
        "decoder_scheduler": diffusers.UnCLIPScheduler,
        "super_res_scheduler": diffusers.UnCLIPScheduler,
    }
    parts = {name: cls.from_pretrained(folder, subfolder=name) for name, cls in load.items()}
    pipe = diffusers.UnCLIPPipeline(**{k: v.eval() if hasattr(v, "eval") else v for k, v in parts.items()})
    pipe.set_progress_bar_config(disable=True)
    return pipe
