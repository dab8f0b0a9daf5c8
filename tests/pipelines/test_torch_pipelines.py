"""PyTorch DDPM/DDIM pipelines against diffusers 0.42.1: fast-test values, scheduler swaps, save/load both ways."""

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.torch.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from tests.pipelines import tiny
from tests.pipelines.tiny import diffusers_reference_loop, swap_config

# diffusers tests/pipelines/ddpm/test_ddpm.py::test_fast_inference (2 steps, seed 0, np output).
DDPM_FAST_SLICE = [0.0, 0.9996672, 0.00329116, 1.0, 0.9995991, 1.0, 0.0060907, 0.00115037, 0.0]
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {
        "ddpm": tiny.save_diffusers_pipeline(root / "ddpm"),
        "ddim": tiny.save_diffusers_pipeline(root / "ddim", kind="DDIMPipeline", scheduler="DDIMScheduler"),
    }


def _seed_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def test_ddpm_fast_test_expectation(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["ddpm"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(image[0, -3:, -3:, -1].ravel(), DDPM_FAST_SLICE, atol=1e-3)
    as_tuple = pipe(
        generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np", return_dict=False
    )
    np.testing.assert_array_equal(as_tuple[0], image)


def test_ddim_eta0_matches_diffusers_from_generator_and_from_latents(folders):
    ref_pipe = diffusers.DDIMPipeline.from_pretrained(folders["ddim"])
    ref = ref_pipe(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, output_type="np"
    )
    pipe = DiffusionPipeline.from_pretrained(folders["ddim"])
    assert type(pipe) is DDIMPipeline
    ours = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(ours.images, ref.images, atol=2e-3)
    latents = _seed_noise((2, 3, 8, 8), 3)
    from_latents = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(from_latents, ref.images, atol=2e-3)


def test_scheduler_swap_to_ddpm_matches_diffusers_pipeline(folders):
    ref_pipe = diffusers.DDPMPipeline.from_pretrained(folders["ddim"])
    ref_pipe.scheduler = diffusers.DDPMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS, output_type="np").images
    pipe = DDPMPipeline.from_pretrained(folders["ddim"])
    pipe.scheduler = schedulers.from_config(swap_config(pipe.scheduler, "DDPMScheduler"))
    ours = pipe(generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"]
)
def test_scheduler_swap_matches_a_diffusers_loop(folders, name):
    latents = _seed_noise((2, 3, 8, 8), 5)
    ref = diffusers_reference_loop(folders["ddpm"], name, latents, STEPS)
    pipe = DDPMPipeline.from_pretrained(folders["ddpm"])
    pipe.scheduler = schedulers.from_config(swap_config(pipe.scheduler, name))
    ours = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_per_image_generators_make_batch_independent_images(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["ddpm"])
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    batch = pipe(batch_size=2, generator=gens, num_inference_steps=2, output_type="np").images
    single = pipe(batch_size=1, generator=[torch.Generator().manual_seed(5)], num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(batch[1], single.images[0], atol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        pipe(batch_size=3, generator=gens, num_inference_steps=2)


def test_our_save_loads_in_diffusers(folders, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(folders["ddpm"])
    pipe.save_pretrained(tmp_path / "ours")
    ref_pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "ours")
    ref = ref_pipe(generator=torch.Generator().manual_seed(2), num_inference_steps=2, output_type="np").images
    ours = pipe(generator=torch.Generator().manual_seed(2), num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_pil_output_and_bad_arguments(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["ddim"])
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2).images
    assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="pt")
    with pytest.raises(ValueError, match="latents"):
        pipe(latents=np.zeros((1, 3, 4, 4), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="eta"):
        pipe(eta=-1.0, num_inference_steps=2)
    stochastic = pipe(eta=1.0, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np")
    assert np.isfinite(stochastic.images).all()
