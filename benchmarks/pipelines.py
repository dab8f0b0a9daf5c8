"""Text-to-image end to end: ours (torch, flax warm) vs diffusers' StableDiffusion(XL)Pipeline, same run.

    python benchmarks/pipelines.py [--configs tiny sd15 sdxl_tiny sdxl if-tiny if-m] [--repeats 3]
                                   [--unclip unclip-tiny karlo]

Two random-weight pipelines are written once in diffusers' folder layout (tokenizer built from CLIP's
real vocabulary): "tiny" (diffusers' fast-test components) at 64x64 with 25 steps, and "sd15" (the
SD-1.5 UNet, VAE and CLIP ViT-L/14 text encoder architectures) at 256x256 with 4 steps. diffusers,
our torch pipeline and our Flax pipeline load the same folder and run the same prompt from the same
numpy latents (DPM-Solver++ 2M, guidance 7.5, output "np"), interleaved round by round; medians and
ratios to diffusers are printed. The Flax compile time (first call minus a warm call) is its own line.
"if-tiny" / "if-m" are DeepFloyd IF stage I (``IFPipeline`` vs diffusers'; see benchmarks/if_pipelines.py).
"sdxl" is the SDXL base architecture (UNet, VAE, CLIP ViT-L and OpenCLIP bigG text encoders; random weights,
about 3.5B parameters: a GPU-sized run) at 512x512 with 4 steps; "sdxl_tiny" the SDXL fast-test components.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import pipelines_unclip  # noqa: E402  (unCLIP rows, issue 12 §5)
from benchmarks._common import interleaved_medians, machine_line, peak_rss_mib, pin_threads, timed  # noqa: E402
from benchmarks.if_pipelines import IF_CONFIGS, if_contenders, write_if_pipeline  # noqa: E402
from benchmarks.models import SD15_UNET  # noqa: E402

pin_threads()

PROMPT = "A painting of a squirrel eating a burger"
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
CONFIGS = {
    # diffusers' SD fast-test components (text encoder sized for the real 49408-token vocabulary)
    "tiny": {
        "size": 64,
        "steps": 25,
        "unet": dict(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8,
            norm_num_groups=2,
        ),
        "vae": dict(
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=2,
        ),
        "text": dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2),
    },
    # diffusers' SDXL fast-test components (two text encoders, text_time addition embedding)
    "sdxl_tiny": {
        "kind": "sdxl",
        "size": 64,
        "steps": 25,
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=1,
        ),
        "vae": dict(
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=2,
        ),
        "text": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
        "text_2": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
    },
    # stabilityai/stable-diffusion-xl-base-1.0 architectures (random weights)
    "sdxl": {
        "kind": "sdxl",
        "size": 512,
        "steps": 4,
        "unet": dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280),
            cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.13025,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
        "text_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
        ),  # fmt: skip
    },
    # stable-diffusion-v1-5 architectures (random weights)
    "sd15": {
        "size": 256,
        "steps": 4,
        "unet": SD15_UNET,
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
    },
}


def write_pipeline(name: str, folder: Path) -> None:
    """A random-weight diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) folder for config ``name``."""
    import diffusers
    import torch
    import transformers

    from tests.tokenizer_fixtures import write_clip_vocab

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    clip = dict(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
    )
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip, **cfg["text"]))
    vocab_dir = folder / "_vocab"
    write_clip_vocab(vocab_dir)
    tokenizer = transformers.CLIPTokenizer(
        str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=77
    )
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SCHEDULER)
    if cfg.get("kind") == "sdxl":
        encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip, **cfg["text_2"]))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=scheduler,
        )  # fmt: skip
        pipe.save_pretrained(folder / name)
        return
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / name)


def contenders(name: str, folder: Path, compile_line: list[str]):
    """Timed callables for diffusers, ours-torch and ours-flax (compiled before timing) on one folder."""
    import diffusers
    import jax
    import numpy as np
    import torch

    from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
    from diffusion_core.torch import DiffusionPipeline as TorchPipeline

    cfg = CONFIGS[name]
    path = folder / name
    size, steps = cfg["size"], cfg["steps"]
    latent = size // (2 ** (len(cfg["vae"]["block_out_channels"]) - 1))
    latents = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np")
    if cfg.get("kind") == "sdxl":
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    else:
        ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours_t = TorchPipeline.from_pretrained(path)
    ours_f = FlaxPipeline.from_pretrained(path)
    for p in (ours_t, ours_f):
        p.set_progress_bar_config(disable=True)

    def run_ref():
        with torch.inference_mode():
            return ref(PROMPT, latents=torch.from_numpy(latents), **kw).images

    def run_torch():
        return ours_t(PROMPT, latents=latents, **kw).images

    def run_flax():
        return np.asarray(ours_f(PROMPT, latents=latents, key=jax.random.key(0), **kw).images)

    start = time.perf_counter()
    first = run_flax()
    first_s = time.perf_counter() - start
    warm_s = timed(run_flax)
    compile_s = first_s - warm_s
    compile_line.append(f"{name}: flax first call {first_s:.1f}s, warm {warm_s:.2f}s -> compile ~{compile_s:.1f}s")
    diff_t = float(np.abs(run_torch() - run_ref()).max())
    diff_f = float(np.abs(first - run_ref()).max())
    compile_line.append(f"{name}: max |pixel diff| vs diffusers: torch {diff_t:.1e}, flax {diff_f:.1e}")
    return {
        "diffusers": lambda: timed(run_ref),
        "torch": lambda: timed(run_torch),
        "flax": lambda: timed(run_flax),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "sd15"], choices=sorted(CONFIGS) + sorted(IF_CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the temporary pipelines")
    # unCLIP (issue 12 §5): benchmarks/pipelines_unclip.py
    parser.add_argument("--unclip", nargs="*", default=[], choices=sorted(pipelines_unclip.CONFIGS))
    args = parser.parse_args()
    import diffusers
    import torch

    torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
    diffusers.utils.logging.set_verbosity_error()
    print(machine_line())
    print(f"{'config':7} {'size':>5} {'steps':>5} {'diffusers':>10} {'torch':>8} {'ratio':>6} {'flax':>8} {'ratio':>6}")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in args.configs:
            is_if = name in IF_CONFIGS
            (write_if_pipeline if is_if else write_pipeline)(name, Path(tmp))
            med = interleaved_medians((if_contenders if is_if else contenders)(name, Path(tmp), notes), args.repeats)
            cfg = IF_CONFIGS[name] if is_if else CONFIGS[name]
            print(
                f"{name:7} {cfg['size']:5d} {cfg['steps']:5d} {med['diffusers']:9.2f}s {med['torch']:7.2f}s "
                f"{med['torch'] / med['diffusers']:6.2f} {med['flax']:7.2f}s {med['flax'] / med['diffusers']:6.2f}",
                flush=True,
            )
    for line in notes:
        print(line)
    pipelines_unclip.run(args.unclip, args.repeats, args.tmp)  # unCLIP (issue 12 §5)
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
