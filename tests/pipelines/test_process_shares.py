"""Every SD-family pipeline splits over processes: the shares of 2, 3 and 4 simulated ranks, joined, are the whole call.

One process plays each rank in turn (``distributed.rank``/``world_size`` patched, the gather left out), so the
pipelines torchrun does not launch in ``test_torchrun`` are checked cheaply: inpainting (mask and masked-image
channels), ControlNet (per-net control images), SDXL (guided ``text_embeds``/``time_ids``) and the x2 latent
upscaler (guided ``time_cond``), with guidance on; and more processes than images (a rank with none).
"""

import numpy as np
import pytest
import torch

from diffusion_core.pipelines.sd_recipe import images_of_inputs
from diffusion_core.torch import distributed
from diffusion_core.torch.pipelines import DiffusionPipeline
from tests.pipelines import sd_tiny, sdxl_tiny

PROMPTS = ["a squirrel", "a red fox", "a lighthouse"]
IMAGE = sd_tiny.sample_image()


def _save(kind, folder):
    if kind == "sdxl":
        return sdxl_tiny.save_sdxl_pipeline(folder)
    return sd_tiny.save_sd_pipeline(folder, kind)


SIZE = dict(height=32, width=32)
CASES = {  # pipeline kind -> the call's extra arguments
    "StableDiffusionInpaintPipeline": dict(image=IMAGE, mask_image=sd_tiny.sample_mask(), strength=0.8, **SIZE),
    "StableDiffusionControlNetPipeline": dict(image=IMAGE, **SIZE),
    "sdxl": dict(**SIZE),
    "StableDiffusionLatentUpscalePipeline": dict(
        image=np.concatenate([sd_tiny.sample_image(16, 16, s) for s in range(3)])
    ),
}


def _call(pipe, extra):
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, generator=gens, num_inference_steps=3, output_type="np", negative_prompt="blurry", **extra)


@pytest.mark.parametrize("kind", list(CASES))
def test_simulated_ranks_join_to_the_whole_call(kind, tmp_path, monkeypatch):
    pipe = DiffusionPipeline.from_pretrained(_save(kind, tmp_path / kind))
    pipe.set_progress_bar_config(disable=True)
    whole = _call(pipe, CASES[kind]).images
    pipe.enable_distributed()
    monkeypatch.setattr(distributed, "all_gather_rows", lambda rows: rows)  # each simulated rank keeps its share
    for world in (2, 3, 4):  # 4: one rank has no image
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        shares = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            shares.append(_call(pipe, CASES[kind]).images)
        assert [len(s) for s in shares] == {2: [2, 1], 3: [1, 1, 1], 4: [1, 1, 1, 0]}[world]
        np.testing.assert_allclose(np.concatenate(shares), whole, atol=1e-5, err_msg=f"{kind}, {world} ranks")
    assert np.abs(whole[0] - whole[1]).max() > 1e-3  # prompts and seeds differ: so do the images


def test_images_of_inputs_takes_each_guidance_parts_rows():
    n, parts = 5, 2
    context = np.arange(parts * n)[:, None] * np.ones((1, 3))  # (parts * N, 3): row k is negative k<5, else positive
    noise = np.arange(n)[:, None, None] * np.ones((1, 2, 2))  # (N, 2, 2)
    out = images_of_inputs({"context": context, "noise": noise}, slice(3, 5), parts)
    np.testing.assert_array_equal(out["context"][:, 0], [3, 4, 8, 9])  # negatives of images 3, 4, then positives
    np.testing.assert_array_equal(out["noise"][:, 0, 0], [3, 4])


def test_ddpm_with_more_processes_than_images(tmp_path, monkeypatch):
    from tests.pipelines import tiny

    pipe = DiffusionPipeline.from_pretrained(tiny.save_diffusers_pipeline(tmp_path / "ddpm", unet=tiny.MINI_UNET))
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(batch_size=3, generator=torch.Generator().manual_seed(2), num_inference_steps=2, output_type="np")

    whole = call().images
    pipe.enable_distributed()
    monkeypatch.setattr(distributed, "all_gather_rows", lambda rows: rows)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    shares = []
    for rank in range(4):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(call().images)
    assert [len(s) for s in shares] == [1, 1, 1, 0]
    np.testing.assert_allclose(np.concatenate(shares), whole, atol=1e-5)
