"""The pipeline calls of the torchrun generation test, made by each torchrun process and by the one-process reference.

As a script (``torchrun ... torchrun_calls.py DDPM_FOLDER SD_FOLDER IMG2IMG_FOLDER OUT``) every process joins the
group, enables ``pipe.enable_distributed()``, makes the calls and saves what it got back to ``OUT/rank<r>.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from diffusion_core import schedulers

STEPS = 3
PROMPTS = ["a squirrel eating a burger", "a red fox", "a lighthouse at dusk"]  # 3 images: uneven over 2 processes


def _generators(count: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def ddpm_calls(pipe) -> dict[str, np.ndarray]:
    """Class-conditional DDPM (step noise every step): one generator per image, and one for the batch."""
    labels = np.array([0, 1, 2, 0, 1])
    common = dict(batch_size=5, num_inference_steps=STEPS, output_type="np", class_labels=labels)
    return {
        "ddpm_per_image": pipe(**common, generator=_generators(5, 10)).images,
        "ddpm_one_generator": pipe(**common, generator=torch.Generator().manual_seed(3)).images,
    }


def sd_calls(pipe) -> dict[str, np.ndarray]:
    """Text to image with guidance: DDIM decoded, ancestral Euler (step noise), and latents out."""
    common = dict(negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=6.0)
    out = {"sd_ddim": pipe(PROMPTS, generator=_generators(3, 20), output_type="np", **common).images}
    out["sd_latent"] = pipe(PROMPTS, generator=_generators(3, 20), output_type="latent", **common).images.numpy()
    ddim = pipe.scheduler
    pipe.scheduler = schedulers.from_config({**ddim.config, "_class_name": "EulerAncestralDiscreteScheduler"})
    out["sd_ancestral"] = pipe(
        PROMPTS[:2], num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), output_type="np", **common
    ).images
    pipe.scheduler = ddim
    return out


def img2img_calls(pipe) -> dict[str, np.ndarray]:
    """img2img: VAE posterior noise and start noise per image, a mid-schedule start."""
    image = np.random.default_rng(1).random((1, 32, 32, 3)).astype(np.float32)  # (1, H, W, 3) in [0, 1]
    images = pipe(
        PROMPTS, image=image, strength=0.7, num_inference_steps=4, generator=_generators(3, 30), output_type="np"
    ).images
    return {"img2img": images}


CALLS = (ddpm_calls, sd_calls, img2img_calls)  # one per pipeline folder, in the script's argument order


def run_calls(folders, distributed: bool) -> dict[str, np.ndarray]:
    """Every call's images, and ``unet_rows``: the batch rows this process ran through the UNets."""
    from diffusion_core.torch.pipelines import DiffusionPipeline

    results, rows = {}, []
    for folder, calls in zip(folders, CALLS, strict=True):
        pipe = DiffusionPipeline.from_pretrained(folder).enable_distributed(distributed)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
        results.update(calls(pipe))
    return {**results, "unet_rows": np.array(sum(rows))}


def main(ddpm: str, sd: str, img2img: str, out: str) -> None:
    from diffusion_core.torch import distributed

    assert distributed.initialize()
    results = run_calls((ddpm, sd, img2img), distributed=True)
    np.savez(Path(out) / f"rank{distributed.rank()}.npz", world_size=np.array(distributed.world_size()), **results)


if __name__ == "__main__":
    main(*sys.argv[1:5])
