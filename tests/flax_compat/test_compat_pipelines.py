"""flax.compat pipelines: 0.39-style calls (single device and replicate/shard/jit=True over 8 CPU devices)
equal the native Flax pipeline's call with the same start latents, on the tiny SD pipeline."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax.jax_utils import replicate
from flax.training.common_utils import shard

from diffusion_core.flax import compat
from diffusion_core.flax.pipelines import DiffusionPipeline
from tests.pipelines import sd_tiny

STEPS = 2
SIZE = {"height": 32, "width": 32}  # latents (4, 16, 16) with the tiny VAE (scale factor 2)
ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def loaded(folder):
    return compat.FlaxStableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


@pytest.fixture(scope="module")
def native(loaded):
    """The native pipeline the compat one wraps: calling it directly reuses its compiled programs."""
    assert isinstance(loaded[0].native, DiffusionPipeline)
    return loaded[0].native


def test_from_pretrained_returns_pipeline_and_params(loaded, folder):
    pipeline, params = loaded
    assert set(params) == {"unet", "vae", "text_encoder", "scheduler"}
    assert isinstance(pipeline.scheduler, compat.FlaxDDIMScheduler)
    ids = pipeline.prepare_inputs([sd_tiny.PROMPT, "a cat"])
    assert ids.shape == (2, 77) and ids[0, 0] == 49406
    again, _ = compat.FlaxDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert isinstance(again, compat.FlaxStableDiffusionPipeline)
    with pytest.raises(ValueError, match="safety_checker"):
        compat.FlaxStableDiffusionPipeline.from_pretrained(folder, safety_checker=object())


def test_single_device_call_equals_native(loaded, native):
    pipeline, params = loaded
    key = jax.random.key(0)
    prompts = [sd_tiny.PROMPT, "a cat"]
    out = pipeline(pipeline.prepare_inputs(prompts), params, key, num_inference_steps=STEPS, guidance_scale=6.0, **SIZE)
    assert out.images.shape == (2, 32, 32, 3)
    start = np.asarray(jax.random.normal(key, (2, 4, 16, 16)))  # 0.39's draw
    ref = native(prompts, num_inference_steps=STEPS, guidance_scale=6.0, latents=start, output_type="np", **SIZE).images
    np.testing.assert_allclose(out.images, ref, atol=ATOL)
    assert len(pipeline.numpy_to_pil(out.images)) == 2


def test_jit_replicated_sharded_call_equals_native_pmap(loaded, native):
    """The HF Flax blog's call: replicate(params), shard(prompt_ids), split(key, n_devices), jit=True."""
    pipeline, params = loaded
    n = jax.device_count()
    assert n == 8
    prompts = [sd_tiny.PROMPT] * n
    keys = jax.random.split(jax.random.key(0), n)
    out = pipeline(shard(pipeline.prepare_inputs(prompts)), replicate(params), keys, STEPS, **SIZE, jit=True).images
    assert out.shape == (n, 1, 32, 32, 3)
    start = np.concatenate([np.asarray(jax.random.normal(k, (1, 4, 16, 16))) for k in keys])
    ref = native(prompts, num_inference_steps=STEPS, latents=start, output_type="np", parallel="pmap", **SIZE).images
    np.testing.assert_allclose(out.reshape(n, 32, 32, 3), ref, atol=ATOL)


def test_bad_inputs(loaded):
    pipeline, params = loaded
    ids = pipeline.prepare_inputs(["x"])
    with pytest.raises(ValueError, match="params"):
        pipeline(ids, {"unet": params["unet"]}, jax.random.key(0), STEPS)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline(ids, params, jax.random.key(0), STEPS, guidance_scale=np.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="prompt_ids"):
        pipeline(ids[0], params, jax.random.key(0), STEPS, jit=True)


def test_controlnet_call_equals_native(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "cn", "StableDiffusionControlNetPipeline")
    pipeline, params = compat.FlaxStableDiffusionControlNetPipeline.from_pretrained(folder, safety_checker=None)
    assert "controlnet" in params and isinstance(pipeline.controlnet, compat.FlaxControlNetModel)
    image = sd_tiny.sample_image()  # (1, 32, 32, 3) in [0, 1]
    from PIL import Image

    control = pipeline.prepare_image_inputs(Image.fromarray((image[0] * 255).round().astype(np.uint8)))
    assert control.shape == (1, 3, 32, 32)
    key = jax.random.key(3)
    ids = pipeline.prepare_text_inputs([sd_tiny.PROMPT])
    out = pipeline(ids, control, params, key, num_inference_steps=STEPS, controlnet_conditioning_scale=0.7)
    start = np.asarray(jax.random.normal(key, (1, 4, 16, 16)))
    ref = pipeline.native(
        sd_tiny.PROMPT, image=control.transpose(0, 2, 3, 1), num_inference_steps=STEPS, latents=start,
        controlnet_conditioning_scale=0.7, output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(out.images, ref, atol=ATOL)


def test_img2img_call_equals_native(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "i2i", "StableDiffusionImg2ImgPipeline")
    pipeline, params = compat.FlaxStableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    from PIL import Image

    picture = Image.fromarray((sd_tiny.sample_image()[0] * 255).round().astype(np.uint8))
    ids, image = pipeline.prepare_inputs([sd_tiny.PROMPT], [picture])
    assert ids.shape == (1, 77) and image.shape == (1, 3, 32, 32) and image.min() >= -1 and image.max() <= 1
    key = jax.random.key(5)
    out = pipeline(ids, image, params, key, strength=0.6, num_inference_steps=4).images
    start = np.asarray(jax.random.normal(key, (1, 4, 16, 16)))  # 0.39's noise draw
    posterior = np.asarray(jax.random.normal(key, (1, 16, 16, 4))).transpose(0, 3, 1, 2)  # same key, channels-last
    ref = pipeline.native(
        sd_tiny.PROMPT, image=(image.transpose(0, 2, 3, 1) + 1) / 2, strength=0.6, num_inference_steps=4,
        latents=start, posterior_noise=posterior, output_type="np",
    ).images  # fmt: skip
    other = pipeline.native(
        sd_tiny.PROMPT, image=(image.transpose(0, 2, 3, 1) + 1) / 2, strength=0.6, num_inference_steps=4,
        key=key, latents=start, output_type="np",
    ).images  # fmt: skip
    assert np.abs(other - ref).max() > 1e-3  # the native posterior draw differs: the test sees the noise
    np.testing.assert_allclose(out, ref, atol=ATOL)
    with pytest.raises(ValueError, match="height"):
        pipeline(ids, image, params, key, height=64)


def test_inpaint_call_equals_native(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "inp", "StableDiffusionInpaintPipeline")
    pipeline, params = compat.FlaxStableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    from PIL import Image

    picture = Image.fromarray((sd_tiny.sample_image()[0] * 255).round().astype(np.uint8))
    mask = Image.fromarray((sd_tiny.sample_mask()[0, ..., 0] * 255).astype(np.uint8))
    ids, masked, binary = pipeline.prepare_inputs([sd_tiny.PROMPT], [picture], [mask])
    assert masked.shape == (1, 3, 32, 32) and binary.shape == (1, 1, 32, 32) and set(np.unique(binary)) == {0, 1}
    assert np.all(masked[:, :, binary[0, 0] > 0.5] == 0)
    key = jax.random.key(6)
    out = pipeline(ids, binary, masked, params, key, num_inference_steps=STEPS).images
    start = np.asarray(jax.random.normal(key, (1, 4, 16, 16)))  # 0.39's draw: the VAE's latent channels
    mask_key = jax.random.split(key)[1]  # 0.39: prng_seed, mask_prng_seed = split(prng_seed)
    posterior = np.asarray(jax.random.normal(mask_key, (1, 16, 16, 4))).transpose(0, 3, 1, 2)
    ref = pipeline.native(
        sd_tiny.PROMPT, image=(masked.transpose(0, 2, 3, 1) + 1) / 2, mask_image=binary.transpose(0, 2, 3, 1),
        num_inference_steps=STEPS, latents=start, posterior_noise=posterior, output_type="np", **SIZE,
    ).images  # fmt: skip
    np.testing.assert_allclose(out, ref, atol=ATOL)


def test_posterior_noise_039_draw_order():
    """0.39's posterior draws, written down: img2img reuses each device key channels-last; inpaint splits first."""
    from diffusion_core.flax.compat.image_pipelines import posterior_noise_039

    key = jax.random.PRNGKey(7)  # 0.39 scripts' raw uint32 keys
    one = posterior_noise_039(key, (2, 4, 3, 5), jit=False, split=False)
    np.testing.assert_array_equal(one, np.asarray(jax.random.normal(key, (2, 3, 5, 4))).transpose(0, 3, 1, 2))
    keys = jax.random.split(key, 2)
    both = posterior_noise_039(keys, (4, 4, 3, 5), jit=True, split=True)  # per device: split(k)[1], b = 2
    expected = [np.asarray(jax.random.normal(jax.random.split(k)[1], (2, 3, 5, 4))) for k in keys]
    np.testing.assert_array_equal(both, np.concatenate(expected).transpose(0, 3, 1, 2))


def test_native_posterior_noise_is_checked(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "i2i", "StableDiffusionImg2ImgPipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    image = sd_tiny.sample_image()
    with pytest.raises(ValueError, match="posterior_noise"):
        pipe(sd_tiny.PROMPT, image=image, num_inference_steps=STEPS, key=jax.random.key(0), posterior_noise=np.zeros(3))
