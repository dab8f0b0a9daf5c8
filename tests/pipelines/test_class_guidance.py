"""Classifier-free guidance over the class of a class-conditional UNet2DModel (DDPM/DDIM pipelines).

diffusers' DDPMPipeline takes no class labels; the reference is a loop over diffusers' own UNet2DModel and
DDIMScheduler computing ``uncond + g * (cond - uncond)`` with the "no class" label (DiT's recipe). Both backends
match it; in Flax the labels, the guidance scale and the "no class" label are inputs of the compiled program.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch

from diffusion_core.flax.pipelines import DDIMPipeline as FlaxDDIM
from diffusion_core.pipelines import unconditional as uc
from diffusion_core.torch.pipelines import DDIMPipeline, DDPMPipeline
from tests.pipelines import tiny

UNET = dict(tiny.MINI_UNET, num_class_embeds=4)  # classes 0-2 and the "no class" label 3
NULL, STEPS, SCALE = 3, 3, 3.0
LABELS = np.array([0, 2, 1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the class table clearly matter
        unet.class_embedding.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("cls") / "pipe"
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(path)
    return path


def _start(seed=0):
    return np.random.default_rng(seed).standard_normal((len(LABELS), 3, 8, 8)).astype(np.float32)


def _reference(folder, latents, scale):
    ref = diffusers.DDIMPipeline.from_pretrained(folder)
    sched = ref.scheduler
    sched.set_timesteps(STEPS)
    x, y = torch.from_numpy(latents), torch.from_numpy(LABELS)
    null = torch.full_like(y, NULL)
    with torch.no_grad():
        for t in sched.timesteps:
            uncond = ref.unet(x, t, class_labels=null).sample
            cond = ref.unet(x, t, class_labels=y).sample
            x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _call(scale):
    return dict(
        batch_size=len(LABELS), num_inference_steps=STEPS, output_type="np", class_labels=LABELS,
        guidance_scale=scale, unconditional_class_label=NULL,
    )  # fmt: skip


def test_torch_and_flax_match_a_diffusers_guidance_loop(folder):
    latents = _start()
    expected = _reference(folder, latents, SCALE)
    assert np.abs(expected - _reference(folder, latents, 1.0)).max() > 0.05  # the guidance changes the images
    ours = DDIMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(ours(latents=latents, **_call(SCALE)).images, expected, atol=1e-5)
    flax = FlaxDDIM.from_pretrained(folder)
    flax.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(flax(latents=latents, **_call(SCALE)).images, expected, atol=1e-4)
    # guidance_scale=1 (the default) is the plain conditional model, whatever the "no class" label
    plain = ours(latents=latents, **_call(1.0)).images
    np.testing.assert_allclose(plain, _reference(folder, latents, 1.0), atol=1e-5)


def test_flax_new_labels_scale_and_null_do_not_recompile_and_pmap_agrees(folder):
    pipe = FlaxDDIM.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    key = jax.random.key(5)
    first = pipe(key=key, **_call(SCALE)).images
    traced = pipe.trace_count
    other = pipe(key=key, **dict(_call(2.0), class_labels=np.array([1, 1, 0]), unconditional_class_label=2)).images
    assert pipe.trace_count == traced and pipe.last_compile_seconds == 0.0
    assert not np.allclose(first, other)
    if jax.local_device_count() > 1:  # 8 forced CPU devices (tests/conftest.py): 3 images padded to 8
        np.testing.assert_allclose(pipe(key=key, parallel="pmap", **_call(SCALE)).images, first, atol=1e-5)


def test_guidance_arguments_are_checked(folder):
    pipe = DDPMPipeline.from_pretrained(folder)
    call = dict(batch_size=1, num_inference_steps=1, class_labels=0)
    with pytest.raises(ValueError, match="unconditional_class_label: guidance_scale=2.0 contrasts"):
        pipe(guidance_scale=2.0, **call)
    with pytest.raises(ValueError, match=r"unconditional_class_label must lie in \[0, 4\), got 9"):
        pipe(guidance_scale=2.0, unconditional_class_label=9, **call)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipe(guidance_scale=float("nan"), unconditional_class_label=3, **call)
    plain = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**tiny.MINI_UNET), scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="guidance needs a class-conditional UNet"):
        uc.check_class_guidance(2.0, 0, plain.unet.config)


def test_class_info_round_trip_and_bad_files(tmp_path):
    uc.write_class_info(tmp_path, uc.ClassInfo(("cat", "dog"), 2))
    assert uc.read_class_info(tmp_path) == uc.ClassInfo(("cat", "dog"), 2)
    assert uc.read_class_info(tmp_path / "missing") is None
    (tmp_path / uc.CLASSES_FILE).write_text('{"class_names": ["a", "b"], "unconditional_class_label": 1}')
    with pytest.raises(ValueError, match="unconditional_class_label must be an int >= 2"):
        uc.read_class_info(tmp_path)
    (tmp_path / uc.CLASSES_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected"):
        uc.read_class_info(tmp_path)
