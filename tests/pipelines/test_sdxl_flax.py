"""Flax SDXL pipelines against diffusers 0.42.1 on tiny random-weight base/refiner folders (real CLIP vocab).

Same folders and start latents as the torch tests (``sdxl_tiny``); pixels within 5e-3. Each case costs an XLA
compile on the CPU, so the options are combined into few calls; each is first checked to change the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax.models import AutoencoderKL
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.pipelines.sd_program import vae_encode_sample
from diffusion_core.flax.pipelines.stable_diffusion_xl import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusion_core.flax.sampling import per_example_keys
from diffusion_core.pipelines import conditioning
from diffusion_core.pipelines import stable_diffusion as sd
from tests.pipelines import lora_tiny, sd_tiny, sdxl_tiny

ATOL = 5e-3
SIZE = 32
STEPS = 3
LATENT = (4, SIZE // 2, SIZE // 2)


def _load(folder):
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _load(sdxl_tiny.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "base"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return _load(sdxl_tiny.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "refiner", refiner=True))


def _both(pipes, batch=1, **kwargs):
    lat = sd_tiny.start_latents((batch, *LATENT))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", **kwargs)
    return pipes[0](latents=lat, **common).images, pipes[1](latents=torch.from_numpy(lat), **common).images


def test_loads_by_model_index_class_name(base, refiner):
    assert type(base[0]) is StableDiffusionXLPipeline
    assert type(refiner[0]) is StableDiffusionXLImg2ImgPipeline


def test_text_to_image_matches_diffusers(base):
    a, b = _both(base, prompt=sd_tiny.PROMPT)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    traced = base[0].trace_count
    again = _both(base, prompt="a cat", guidance_scale=3.0)  # same shapes and options: no recompile
    assert base[0].trace_count == traced
    np.testing.assert_allclose(again[0], again[1], atol=ATOL, rtol=0)
    assert np.abs(again[1] - b).max() > 20 * ATOL


def test_options_and_batch_match_diffusers(base):
    options = dict(
        prompt=[sd_tiny.PROMPT, "a cat"], negative_prompt=sd_tiny.NEGATIVE, prompt_2=["a red bird", "a dog"],
        num_images_per_prompt=2, original_size=(64, 48), crops_coords_top_left=(3, 4), guidance_rescale=0.7,
        negative_original_size=(20, 30), negative_target_size=(32, 32), denoising_end=0.5,
    )  # fmt: skip
    a, b = _both(base, batch=4, **options)
    assert a.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    plain = _both(base, batch=4, prompt=[sd_tiny.PROMPT, "a cat"], num_images_per_prompt=2)[1]
    assert np.abs(plain - b).max() > 20 * ATOL


def test_refiner_img2img_latents_as_given(refiner):
    lat = sd_tiny.start_latents((1, *LATENT), seed=3)
    kwargs = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(SIZE, SIZE), strength=0.6, output_type="np")
    a = refiner[0](latents=lat, num_inference_steps=STEPS, **kwargs).images
    b = refiner[1](latents=torch.from_numpy(lat), num_inference_steps=STEPS, **kwargs).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_refiner_encodes_the_image_with_key(refiner):
    """Pixels are VAE-encoded (a posterior draw from the key), noised to ``strength`` and denoised."""
    kwargs = dict(prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(SIZE, SIZE), strength=0.6, output_type="np")
    a = refiner[0](key=jax.random.key(0), num_inference_steps=STEPS, **kwargs).images
    b = refiner[0](key=jax.random.key(0), num_inference_steps=STEPS, **kwargs).images
    c = refiner[0](key=jax.random.key(1), num_inference_steps=STEPS, **kwargs).images
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, SIZE, SIZE, 3) and np.abs(a - c).max() > 1e-3
    with pytest.raises(ValueError, match="key"):
        refiner[0](num_inference_steps=STEPS, **kwargs)


def test_base_to_refiner_ensemble_matches_diffusers(base, refiner):
    lat = sd_tiny.start_latents((1, *LATENT))
    steps = dict(num_inference_steps=5, prompt=sd_tiny.PROMPT)
    ours = base[0](latents=lat, height=SIZE, width=SIZE, denoising_end=0.8, output_type="latent", **steps).images
    ref = base[1](latents=torch.from_numpy(lat), height=SIZE, width=SIZE, denoising_end=0.8, output_type="latent",
                  **steps).images  # fmt: skip
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4, rtol=0)
    a = refiner[0](image=ours, denoising_start=0.8, output_type="np", key=jax.random.key(0), **steps).images
    b = refiner[1](image=ref, denoising_start=0.8, output_type="np", **steps).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def _posterior_latents(pipe, pixels, key, stream):
    """Our scaled VAE posterior draw for image 0 of a call with ``key`` (what the pipeline encodes)."""
    draw = vae_encode_sample(pipe.vae, jnp.asarray(pixels), per_example_keys(key, pixels.shape[0]), stream)
    return np.asarray(sd.scale_latents(draw, pipe.vae.config))


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_matches_diffusers(tmp_path, channels):
    """Strength 1 from the same start draw; diffusers gets our VAE posterior draws (of the image for a blending
    4-channel UNet, of the masked image for a 9-channel one) as latents, as in the SD inpaint tests."""
    folder = sdxl_tiny.save_sdxl_inpaint_pipeline(tmp_path / "inpaint", channels)
    ours, ref = _load(folder)
    assert type(ours) is StableDiffusionXLInpaintPipeline
    image, mask, key = sd_tiny.sample_image(SIZE, SIZE), sd_tiny.sample_mask(SIZE, SIZE), jax.random.key(5)
    pixels = 2.0 * image.transpose(0, 3, 1, 2) - 1.0
    common = dict(
        prompt=sd_tiny.PROMPT, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS, strength=1.0,
        denoising_end=0.9, output_type="np",
    )  # fmt: skip
    noise = sd_tiny.start_latents((1, *LATENT), seed=12)
    a = ours(image=image, key=key, latents=noise, **common).images
    if channels == 9:
        masked = _posterior_latents(ours, conditioning.masked_image(pixels, mask.transpose(0, 3, 1, 2)), key, 1)
        ref_image, ref_masked = image, torch.from_numpy(masked)
    else:
        ref_image, ref_masked = torch.from_numpy(_posterior_latents(ours, pixels, key, 0)), torch.zeros((1, *LATENT))
    b = ref(image=ref_image, masked_image_latents=ref_masked, latents=torch.from_numpy(noise), **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(b[0] - image[0]).max() > 20 * ATOL


@pytest.mark.parametrize(
    "options", [dict(), dict(guess_mode=True, controlnet_conditioning_scale=0.7)], ids=["default", "guess-mode"]
)
def test_controlnet_matches_diffusers(tmp_path_factory, options):
    folder = sdxl_tiny.save_sdxl_controlnet_pipeline(tmp_path_factory.mktemp("sdxl") / "controlnet")
    pipes = _load(folder)
    assert type(pipes[0]) is StableDiffusionXLControlNetPipeline
    a, b = _both(pipes, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(SIZE, SIZE, seed=4), **options)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_float16_vae_decodes_as_a_float32_copy_when_force_upcast(base, tmp_path):
    ours = base[0]
    ours.vae.save_pretrained(tmp_path / "vae")
    vae16 = AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=jnp.float16)
    pipe = StableDiffusionXLPipeline(**{**ours.components, "vae": vae16})
    assert vae16.config["force_upcast"] is True
    up = pipe._decoding_vae()
    assert up is not vae16 and up.dtype == jnp.float32 and pipe._decoding_vae() is up  # made once
    kernel16, kernel32 = vae16.decoder.conv_in.kernel[...], up.decoder.conv_in.kernel[...]
    assert kernel32.dtype == jnp.float32 and np.array_equal(np.asarray(kernel32), np.asarray(kernel16, np.float32))
    z = sd_tiny.start_latents((1, *LATENT))
    np.testing.assert_allclose(pipe._vae_decode(z), ours._vae_decode(z), atol=2e-2, rtol=0)  # float16 weights
    assert ours._decoding_vae() is ours.vae  # float32 VAEs decode as they are


def test_multi_controlnet_matches_diffusers(tmp_path):
    """Two ControlNets (``MultiControlNetModel``) each given the SDXL added conditioning, per-net scales/windows."""
    pipes = _load(sdxl_tiny.save_sdxl_controlnet_pipeline(tmp_path / "multi", nets=2))
    assert type(pipes[0]) is StableDiffusionXLControlNetPipeline and len(pipes[0].controlnet.nets) == 2
    images = [sd_tiny.sample_image(SIZE, SIZE, seed=s) for s in (4, 5)]
    lat = sd_tiny.start_latents((1, *LATENT))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", prompt=sd_tiny.PROMPT)
    options = dict(controlnet_conditioning_scale=[0.8, 1.3], control_guidance_end=[1.0, 0.5])
    a = pipes[0](latents=lat, image=images, **common, **options).images
    torch_images = [torch.from_numpy(im).permute(0, 3, 1, 2) for im in images]
    b = pipes[1](latents=torch.from_numpy(lat), image=torch_images, **common, **options).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_compile_then_first_call_does_not_compile(base):
    """``pipe.compile`` (AOT) on SDXL: the later call of that shape neither traces nor compiles the loop."""
    ours = base[0]
    shape = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=6.5)
    traced = ours.trace_count
    assert ours.compile(batch_size=1, **shape) > 0.0 and ours.trace_count == traced + 1
    out = ours(prompt=sd_tiny.PROMPT, key=jax.random.key(2), output_type="np", **shape)
    assert ours.trace_count == traced + 1 and ours.last_compile_seconds == 0.0
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


def test_lora_matches_diffusers(tmp_path, base):
    """A diffusers+peft LoRA on the UNet and both text encoders (``lora_tiny.save_sdxl_peft_lora``); the LoRA
    structure is in the compiled-program key, so the base pipeline's program is not reused wrongly."""
    folder = sdxl_tiny.save_sdxl_pipeline(tmp_path / "base")
    pipes = _load(folder)
    plain = _both(pipes, prompt=sd_tiny.PROMPT)[0]
    lora = lora_tiny.save_sdxl_peft_lora(tmp_path / "lora")
    for pipe in pipes:
        pipe.load_lora_weights(lora, adapter_name="x")
    a, b = _both(pipes, prompt=sd_tiny.PROMPT)
    assert np.abs(a - plain).max() > 10 * ATOL
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
