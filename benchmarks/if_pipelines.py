"""DeepFloyd IF stage I entries of ``benchmarks/pipelines.py``: folders and timed contenders.

Two random-weight ``IFPipeline`` folders written with diffusers' ``save_pretrained`` (T5 tokenizer trained here
with sentencepiece, as the tests do): "if-tiny" (the tests' tiny UNet and T5) at 32x32, 25 steps, and "if-m" (an
IF-I-M-like stage I UNet: four levels 256..1024, three layers each, 4096-wide text, 64x64; with a T5-XXL-wide
encoder cut to 2 of its 24 layers, so the text encoder is not the whole story) with 4 steps. DDPMScheduler
(learned_range, thresholding) as published, guidance 7.0, output "np". DDPM draws noise at every step, so only
torch is compared with diffusers pixel by pixel (same generator); flax draws from its key.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import timed

PROMPT = "a photo of a red fox in the snow"
IF_I_M_UNET = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(256, 512, 768, 1024),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    cross_attention_dim=1024, encoder_hid_dim=4096, attention_head_dim=64, addition_embed_type="text",
    addition_embed_type_num_heads=64, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True, resnet_out_scale_factor=1.414, act_fn="gelu",
)  # fmt: skip
T5_XXL_2_LAYERS = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu")
IF_CONFIGS = {"if-tiny": {"size": 32, "steps": 25}, "if-m": {"size": 64, "steps": 4}}


def write_if_pipeline(name: str, folder: Path) -> None:
    """A random-weight diffusers IFPipeline folder for config ``name`` at ``folder / name``."""
    import diffusers
    import torch
    import transformers

    from tests.pipelines import if_tiny
    from tests.t5_spiece import write_spiece_folder

    (folder / "_spiece").mkdir(exist_ok=True)
    tokenizer = transformers.T5Tokenizer.from_pretrained(write_spiece_folder(folder / "_spiece"))
    if name == "if-tiny":
        unet, encoder = if_tiny.random_unet(if_tiny.IF_STAGE_I), if_tiny.tiny_t5(len(tokenizer))
    else:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**IF_I_M_UNET).eval()
        encoder = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32128, **T5_XXL_2_LAYERS)).eval()
    pipe = diffusers.IFPipeline(
        tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=diffusers.DDPMScheduler(**if_tiny.IF_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / name)


def if_contenders(name: str, folder: Path, notes: list[str]):
    """Timed callables for diffusers, ours-torch and ours-flax (compiled before timing) on one IF folder."""
    import diffusers
    import jax
    import numpy as np
    import torch

    from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
    from diffusion_core.torch import DiffusionPipeline as TorchPipeline

    cfg, path = IF_CONFIGS[name], folder / name
    kw = dict(
        num_inference_steps=cfg["steps"], guidance_scale=7.0, height=cfg["size"], width=cfg["size"],
        output_type="np", clean_caption=False,
    )  # fmt: skip
    ref = diffusers.IFPipeline.from_pretrained(path, safety_checker=None, watermarker=None, feature_extractor=None)
    ours_t, ours_f = TorchPipeline.from_pretrained(path), FlaxPipeline.from_pretrained(path)
    for p in (ref, ours_t, ours_f):
        p.set_progress_bar_config(disable=True)

    def run_ref():
        with torch.inference_mode():
            return ref(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    def run_torch():
        return ours_t(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    def run_flax():
        return np.asarray(ours_f(PROMPT, key=jax.random.key(0), **kw).images)

    start = time.perf_counter()
    run_flax()
    first_s = time.perf_counter() - start
    warm_s = timed(run_flax)
    notes.append(f"{name}: flax first call {first_s:.1f}s, warm {warm_s:.2f}s -> compile ~{first_s - warm_s:.1f}s")
    diff_t = float(np.abs(run_torch() - run_ref()).max())
    notes.append(f"{name}: max |pixel diff| torch vs diffusers (same generator): {diff_t:.1e}; flax: own key (DDPM)")
    return {"diffusers": lambda: timed(run_ref), "torch": lambda: timed(run_torch), "flax": lambda: timed(run_flax)}
