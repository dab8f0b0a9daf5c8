"""Pipeline math written once in diffusion_core: checked against diffusers' formulas on numpy, torch and jax."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.pipelines import conditioning as cond
from diffusion_core.pipelines import guidance

BACKENDS = ["numpy", "torch", "jax"]


def _to(backend, x):
    x = np.asarray(x, dtype=np.float32)
    return {"numpy": lambda: x, "torch": lambda: torch.from_numpy(x.copy()), "jax": lambda: jnp.asarray(x)}[backend]()


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classifier_free_guidance_matches_the_formula(backend):
    uncond, text = _rand(2, 4, 8, 8, seed=1), _rand(2, 4, 8, 8, seed=2)
    guided, cond_half = guidance.classifier_free_guidance(_to(backend, np.concatenate([uncond, text])), 7.5)
    np.testing.assert_allclose(_np(guided), uncond + 7.5 * (text - uncond), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(_np(cond_half), text)
    assert guidance.do_classifier_free_guidance(7.5) and not guidance.do_classifier_free_guidance(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(backend, phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    guided, text = _rand(3, 4, 8, 8, seed=3) * 3, _rand(3, 4, 8, 8, seed=4)
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(text), guidance_rescale=phi).numpy()
    out = guidance.rescale_guidance(_to(backend, guided), _to(backend, text), phi)
    np.testing.assert_allclose(_np(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pix2pix_three_way_guidance_matches_the_formula(backend):
    text, image, uncond = (_rand(1, 4, 4, 4, seed=s) for s in (5, 6, 7))
    out = guidance.pix2pix_guidance(_to(backend, np.concatenate([text, image, uncond])), 7.5, 1.5)
    expected = uncond + 7.5 * (text - image) + 1.5 * (image - uncond)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-6, atol=1e-5)
    assert guidance.do_pix2pix_guidance(7.5, 1.0) and not guidance.do_pix2pix_guidance(7.5, 0.9)


def test_guidance_rejects_bad_batches_and_scales():
    with pytest.raises(ValueError, match="model_output"):
        guidance.classifier_free_guidance(np.zeros((3, 2)), 2.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        guidance.rescale_guidance(np.zeros((2, 2)), np.zeros((2, 2)), 1.5)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.8), (50, 0.75), (7, 1.0), (5, 0.1), (4, 0.0)])
def test_img2img_start_matches_diffusers_get_timesteps(name, steps, strength):
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    ref_sched = getattr(diffusers, name)()
    ref_sched.set_timesteps(steps)
    fake = types.SimpleNamespace(scheduler=ref_sched)
    ref_timesteps, ref_steps = StableDiffusionImg2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
    ours = schedulers.from_config({"_class_name": name})
    first, run = cond.img2img_start(steps, strength, order=ours.order)
    assert run == ref_steps
    state = ours.set_timesteps(steps, like=np.zeros((1,), np.float32))
    np.testing.assert_array_equal(np.asarray(state.timesteps[first:]), ref_timesteps.numpy())
    if first < len(state.timesteps):
        assert int(ours.set_timesteps(steps, like=np.zeros((1,), np.float32), begin_index=first).step_index) == first


def test_img2img_start_rejects_bad_strength():
    with pytest.raises(ValueError, match="strength"):
        cond.img2img_start(10, 1.5)
    with pytest.raises(ValueError, match="begin_index"):
        schedulers.DDIMScheduler().set_timesteps(4, like=np.zeros((1,), np.float32), begin_index=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("size", "out"), [((16, 16), (2, 2)), ((13, 10), (4, 3)), ((4, 6), (8, 12)), ((7, 5), (3, 9))])
def test_resize_nearest_matches_torch_interpolate(backend, size, out):
    x = _rand(2, 3, *size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=out, mode="nearest").numpy()
    np.testing.assert_array_equal(_np(cond.resize_nearest(_to(backend, x), *out)), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inpaint_mask_preparation_follows_diffusers(backend):
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(1, 1, 32, 32)).astype(np.float32)
    image = _rand(1, 3, 32, 32)
    binary = (mask >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(_np(cond.binarize_mask(_to(backend, mask))), binary)
    np.testing.assert_array_equal(_np(cond.masked_image(_to(backend, image), _to(backend, mask))), image * (mask < 0.5))
    ref = torch.nn.functional.interpolate(torch.from_numpy(binary), size=(4, 4)).numpy()
    small = cond.mask_to_latents(_to(backend, mask), 4, 4)
    np.testing.assert_array_equal(_np(small), ref)
    tiled = cond.repeat_to_batch(small, 4, "mask")
    assert tuple(tiled.shape) == (4, 1, 4, 4)
    lat, masked = _rand(4, 4, 4, 4, seed=1), _rand(4, 4, 4, 4, seed=2)
    unet_in = _np(cond.inpaint_unet_input(_to(backend, lat), tiled, _to(backend, masked)))
    np.testing.assert_array_equal(unet_in, np.concatenate([lat, _np(tiled), masked], axis=1))
    orig = _rand(4, 4, 4, 4, seed=3)
    blended = _np(cond.inpaint_blend(_to(backend, lat), _to(backend, orig), tiled))
    np.testing.assert_allclose(blended, (1 - _np(tiled)) * orig + _np(tiled) * lat, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        cond.repeat_to_batch(tiled, 6, "mask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_upscaler_noise_level_uses_the_low_res_scheduler(backend):
    import diffusers

    image, noise = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 8, 8, seed=2)
    ref_sched = diffusers.DDPMScheduler()
    ref = ref_sched.add_noise(torch.from_numpy(image), torch.from_numpy(noise), torch.tensor([20])).numpy()
    noised, labels = cond.upscaler_condition(
        schedulers.DDPMScheduler(), _to(backend, image), _to(backend, noise), 20, max_noise_level=350
    )
    np.testing.assert_allclose(_np(noised), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_np(labels), [20, 20])
    with pytest.raises(ValueError, match="noise_level"):
        cond.check_noise_level(351, 350)


@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_upscaler_preconditioning_matches_the_formula(backend):
    latents, out, pooled = _rand(2, 4, 4, 4, seed=1), _rand(2, 5, 8, 8, seed=2), _rand(2, 32, seed=3)
    cond_img = _np(cond.latent_upscaler_image_cond(_to(backend, latents)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(latents), scale_factor=2, mode="nearest").numpy()
    np.testing.assert_array_equal(cond_img, ref)
    tc = _np(cond.latent_upscaler_timestep_cond(_to(backend, pooled)))
    np.testing.assert_array_equal(tc, np.concatenate([np.ones((2, 64)), np.zeros((2, 64)), pooled], axis=1))
    sigma = 3.7
    x = _rand(2, 4, 8, 8, seed=4)
    pre = _np(cond.latent_upscaler_precondition(_to(backend, x), _to(backend, out), sigma))
    expected = x / (sigma**2 + 1) + sigma / np.sqrt(sigma**2 + 1) * out[:, :-1]
    np.testing.assert_allclose(pre, expected, rtol=1e-6, atol=1e-6)
    t = _np(cond.latent_upscaler_timestep(_to(backend, np.float32(sigma))))
    np.testing.assert_allclose(t, np.log(sigma) * 0.25, rtol=1e-6)
