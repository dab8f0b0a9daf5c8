"""Tiny diffusers pipelines saved to disk (random weights) and Hub-style cache layouts for the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import diffusers
import torch

from diffusion_core import schedulers

# diffusers' DDPM fast-test UNet (tests/pipelines/ddpm/test_ddpm.py).
DDPM_TEST_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
# Smaller still (no attention, one level): quick to compile under jax.
MINI_UNET = dict(
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
)


def diffusers_pipeline(kind: str = "DDPMPipeline", unet: dict | None = None, scheduler: str = "DDPMScheduler"):
    """A diffusers DDPM/DDIM pipeline with a seeded random UNet2DModel."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**(unet or DDPM_TEST_UNET)).eval()
    return getattr(diffusers, kind)(unet=model, scheduler=getattr(diffusers, scheduler)())


def save_diffusers_pipeline(folder: Path, **kwargs) -> Path:
    diffusers_pipeline(**kwargs).save_pretrained(folder)
    return folder


def hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay out ``source`` as the snapshot ``commit`` of ``repo_id`` in a Hub cache, refs/main -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def swap_config(scheduler, name):
    """The scheduler's config for another algorithm, keeping only the options that algorithm has.

    diffusers' schedulers ignore foreign options (DDPM's ``clip_sample``) and DDPM's
    ``variance_type="fixed_small"``; ours act on or reject them (see the report), so the swap drops them.
    """
    own = set(schedulers.get_scheduler_class(name)._defaults) - (
        {"variance_type"} if name != "DDPMScheduler" else set()
    )
    return {**{k: v for k, v in scheduler.config.items() if k in own}, "_class_name": name}


def diffusers_reference_loop(folder, scheduler_name, latents, steps):
    """A sigma-scaled loop with diffusers' own UNet and scheduler (what DDPMPipeline leaves out)."""
    ref_pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    sched = getattr(diffusers, scheduler_name).from_config(swap_config(ref_pipe.scheduler, scheduler_name))
    sched.set_timesteps(steps)
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = ref_pipe.unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
