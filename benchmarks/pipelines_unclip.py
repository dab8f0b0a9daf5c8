"""unCLIP (Karlo) lines of ``benchmarks/pipelines.py``: ours (torch, flax warm) vs diffusers' UnCLIPPipeline.

Two random-weight pipelines are written in diffusers' folder layout (CLIP's real vocabulary): "unclip-tiny"
(diffusers' unCLIP fast-test components, tests/pipelines/unclip_tiny.py) and "karlo" (the karlo-v1-alpha
architectures: diffusers' conversion script's decoder / super-resolution / text-projection configs, the
default ``PriorTransformer`` and the CLIP ViT-L/14 text encoder with projection). diffusers 0.42 cannot reload
its own unCLIP folder, so its pipeline is assembled component by component (``unclip_tiny.load_diffusers``).
Every contender runs the same prompt with a few steps per stage (guidance on, output "np"); torch and
diffusers share a seeded generator, so their images are compared; flax draws its own noise from ``key``.
"karlo" holds ~3.4e9 float32 parameters per pipeline (prior 1.02e9, decoder 0.89e9, each super-resolution UNet
0.69e9, text encoder 0.12e9), three pipelines at once: it needs ~45 GB of memory.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import timed

KARLO_DOWN = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3
KARLO_UP = ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)
KARLO = {
    "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768),
    "prior": {},  # diffusers' defaults are Karlo's: 20 layers, 32 heads x 64, embedding_dim 768
    "text_proj": dict(clip_embeddings_dim=768, time_embed_dim=1280, cross_attention_dim=1536),
    "decoder": dict(
        sample_size=64, layers_per_block=3, down_block_types=KARLO_DOWN, up_block_types=KARLO_UP,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280), in_channels=3,
        out_channels=6, cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
    ),
    "super_res": dict(
        sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
        up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280), in_channels=6,
        out_channels=3, add_attention=False,
    ),
}  # fmt: skip
CONFIGS = {
    "unclip-tiny": dict(prior_num_inference_steps=10, decoder_num_inference_steps=10, super_res_num_inference_steps=7),
    "karlo": dict(prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2),
}


def _karlo_components() -> dict:
    """Random-weight Karlo-size components, the schedulers and tokenizer as in the tiny pipeline."""
    import diffusers
    import torch
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from tests.pipelines import unclip_tiny

    torch.manual_seed(0)
    parts = unclip_tiny.components()  # tokenizer and the three UnCLIPSchedulers
    text = transformers.CLIPTextConfig(**{**unclip_tiny.TEXT, **KARLO["text"]})
    parts.update(
        text_encoder=transformers.CLIPTextModelWithProjection(text).eval(),
        prior=diffusers.PriorTransformer(**KARLO["prior"]).eval(),
        text_proj=UnCLIPTextProjModel(**KARLO["text_proj"]).eval(),
        decoder=diffusers.UNet2DConditionModel(**KARLO["decoder"]).eval(),
        super_res_first=diffusers.UNet2DModel(**KARLO["super_res"]).eval(),
        super_res_last=diffusers.UNet2DModel(**KARLO["super_res"]).eval(),
    )
    with torch.no_grad():
        parts["prior"].clip_std.fill_(1.0)  # diffusers starts it at 0 (a real checkpoint holds CLIP's statistics)
    return parts


def write_pipeline(name: str, folder: Path) -> Path:
    """A random-weight diffusers UnCLIPPipeline folder for config ``name``."""
    import diffusers

    from tests.pipelines import unclip_tiny

    parts = unclip_tiny.components() if name == "unclip-tiny" else _karlo_components()
    diffusers.UnCLIPPipeline(**parts).save_pretrained(folder / name)
    return folder / name


def contenders(name: str, folder: Path, notes: list[str]):
    """Timed callables for diffusers, ours-torch and ours-flax (compiled before timing) on one folder."""
    import jax
    import numpy as np
    import torch

    from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
    from diffusion_core.torch import DiffusionPipeline as TorchPipeline
    from tests.pipelines import unclip_tiny

    path = write_pipeline(name, folder)
    kw = dict(CONFIGS[name], output_type="np")
    ref = unclip_tiny.load_diffusers(path)
    ours_t = TorchPipeline.from_pretrained(path)
    ours_f = FlaxPipeline.from_pretrained(path)
    for p in (ours_t, ours_f):
        p.set_progress_bar_config(disable=True)

    def run_ref():
        with torch.inference_mode():
            return ref(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    def run_torch():
        return ours_t(unclip_tiny.PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    def run_flax():
        return np.asarray(ours_f(unclip_tiny.PROMPT, key=jax.random.key(0), **kw).images)

    start = time.perf_counter()
    run_flax()
    first_s = time.perf_counter() - start
    warm_s = timed(run_flax)
    notes.append(f"{name}: flax first call {first_s:.1f}s, warm {warm_s:.2f}s -> compile ~{first_s - warm_s:.1f}s")
    diff_t = float(np.abs(run_torch() - run_ref()).max())
    notes.append(f"{name}: max |pixel diff| torch vs diffusers (same generator): {diff_t:.1e}")
    return {
        "diffusers": lambda: timed(run_ref),
        "torch": lambda: timed(run_torch),
        "flax": lambda: timed(run_flax),
    }


def steps_label(name: str) -> str:
    """'prior/decoder/super-res' steps of config ``name``."""
    c = CONFIGS[name]
    return f"{c['prior_num_inference_steps']}/{c['decoder_num_inference_steps']}/{c['super_res_num_inference_steps']}"


def run(names: list[str], repeats: int, tmp: str | None) -> None:
    """Print one row per unCLIP config (interleaved medians), then its compile and parity notes."""
    import tempfile

    from benchmarks._common import interleaved_medians

    if not names:
        return
    print(f"{'unclip':12} {'steps p/d/s':>11} {'diffusers':>10} {'torch':>8} {'ratio':>6} {'flax':>8} {'ratio':>6}")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        for name in names:
            med = interleaved_medians(contenders(name, Path(folder), notes), repeats)
            print(
                f"{name:12} {steps_label(name):>11} {med['diffusers']:9.2f}s {med['torch']:7.2f}s "
                f"{med['torch'] / med['diffusers']:6.2f} {med['flax']:7.2f}s {med['flax'] / med['diffusers']:6.2f}",
                flush=True,
            )
    for line in notes:
        print(line)
