"""Flax Stable Diffusion pipelines against diffusers 0.42.1 on tiny random-weight checkpoints (real CLIP vocab).

Parity tests load a diffusers-saved folder with our Flax ``DiffusionPipeline.from_pretrained`` and compare pixels
(``output_type="np"``) with diffusers run on the same folder and the same start latents. Programs are compiled
once per (shapes, static options): tests reuse shapes so the module compiles few programs.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.pipelines.sd_program import vae_encode_sample
from diffusion_core.flax.pipelines.sd_upscale import LOW_RES_STREAM
from diffusion_core.flax.pipelines.stable_diffusion import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from diffusion_core.flax.sampling import per_example_keys, per_example_normal
from diffusion_core.pipelines import conditioning
from diffusion_core.pipelines import stable_diffusion as sd
from tests.pipelines import sd_tiny

ATOL = 5e-3
SIZE = 32  # pixels; latents are (B, 4, 16, 16) with the tiny VAE (scale factor 2)
LATENT = (4, SIZE // 2, SIZE // 2)
STEPS = 2
# DDIM runs by default; every other scheduler is one more compiled program (~30 s on a shared CPU): slow.
SCHEDULERS = ["DDIMScheduler"] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def ours(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref(sd_folder):
    return sd_tiny.load_diffusers(sd_folder)


def _both(ours_pipe, ref_pipe, batch=1, seed=0, **kwargs):
    """Run both pipelines with the same numpy start latents; returns (ours, reference) np images."""
    lat = sd_tiny.start_latents((batch,) + LATENT, seed)
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", **kwargs)
    a = ours_pipe(latents=lat, **common).images
    b = ref_pipe(latents=torch.from_numpy(lat), **common).images
    return a, b


def test_loads_as_stable_diffusion_pipeline(ours):
    assert type(ours) is StableDiffusionPipeline
    assert ours.safety_checker is None and ours.feature_extractor is None and ours.image_encoder is None


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_matches_diffusers_per_scheduler(ours, ref, scheduler):
    restore = sd_tiny.swap_schedulers(ours, ref, scheduler)
    try:
        a, b = _both(ours, ref, prompt=sd_tiny.PROMPT, guidance_scale=6.0)
        traced = ours.trace_count
        # same shapes and static options: another prompt and guidance scale reuse the compiled program
        again = ours(
            prompt="a cat",
            guidance_scale=3.0,
            latents=sd_tiny.start_latents((1,) + LATENT, 1),
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            output_type="np",
        ).images
    finally:
        restore()
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert ours.trace_count == traced
    assert not np.allclose(again, a)


def _reference_embeddings(ref_pipe, texts, clip_skip=None):
    """Text embeddings computed with transformers (diffusers 0.42.1's clip_skip path needs ``text_model``,
    which transformers 5 removed): hidden_states[-(k + 1)] -> final_layer_norm."""
    ids = ref_pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref_pipe.text_encoder(ids.input_ids, output_hidden_states=True)
        if clip_skip is None:
            return out.last_hidden_state
        return ref_pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.slow
def test_prompt_options_match_diffusers(ours, ref):
    """Two prompts x two images, negative prompts, clip_skip and guidance_rescale in one (4-image) call."""
    prompts = [sd_tiny.PROMPT, "a photo of an astronaut riding a horse"]
    negatives = [sd_tiny.NEGATIVE, "ugly"]
    lat = sd_tiny.start_latents((4,) + LATENT, 3)
    common = dict(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", num_images_per_prompt=2,
        guidance_scale=7.0, guidance_rescale=0.7,
    )  # fmt: skip
    a = ours(prompt=prompts, negative_prompt=negatives, clip_skip=1, latents=lat, **common).images
    pos = _reference_embeddings(ref, prompts, clip_skip=1)
    neg = _reference_embeddings(ref, negatives)
    b = ref(prompt_embeds=pos, negative_prompt_embeds=neg, latents=torch.from_numpy(lat), **common).images
    assert a.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    embeds = ours(prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(), latents=lat, **common).images
    np.testing.assert_allclose(embeds, a, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_custom_timesteps_and_sigmas_match_diffusers(ours, ref):
    lat = sd_tiny.start_latents((1,) + LATENT)
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, output_type="np")
    with pytest.raises(ValueError, match="timesteps: DDIMScheduler does not accept custom timesteps"):
        ours(latents=lat, timesteps=[901, 500, 101], **common)  # diffusers' DDIM refuses too
    restore = sd_tiny.swap_schedulers(ours, ref, "EulerDiscreteScheduler")
    try:
        results = []
        for custom in (dict(timesteps=[901, 500, 101]), dict(sigmas=[10.0, 3.0, 0.5]), dict(sigmas=[8.0, 2.0, 0.3])):
            a = ours(latents=lat, **custom, **common).images
            b = ref(latents=torch.from_numpy(lat), **custom, **common).images
            results.append((a, b, ours.trace_count))
    finally:
        restore()
    for a, b, _ in results:
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert results[2][2] == results[1][2]  # other sigmas of the same length: the compiled program is reused


@pytest.mark.slow
def test_no_guidance_matches_diffusers(ours, ref):
    a, b = _both(ours, ref, seed=4, prompt=sd_tiny.PROMPT, guidance_scale=1.0)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_backend_swap_torch_and_flax_agree(sd_folder, ours):
    from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline as TorchPipeline

    torch_pipe = TorchPipeline.from_pretrained(sd_folder)
    torch_pipe.set_progress_bar_config(disable=True)
    lat = sd_tiny.start_latents((1,) + LATENT, 5)
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    a = ours(latents=lat, guidance_scale=6.0, **common).images
    b = torch_pipe(latents=lat, guidance_scale=6.0, **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_key_draws_per_image_and_pmap_mesh_match_one_device(ours):
    """Image i starts from normal(fold_in(key, i)): independent of the batch size and of pmap / mesh."""
    assert jax.local_device_count() == 8
    key = jax.random.key(7)
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    single = ours(num_images_per_prompt=8, key=key, **common).images
    pmapped = ours(num_images_per_prompt=8, key=key, parallel="pmap", **common).images
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = ours(num_images_per_prompt=8, key=key, mesh=mesh, **common).images
    np.testing.assert_allclose(pmapped, single, atol=1e-5)
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    alone = ours(key=key, **common).images
    np.testing.assert_allclose(alone[0], single[0], atol=1e-5)
    vae_weights = jax.tree.leaves(nnx.state(ours.vae))  # decoding sharded latents leaves them on one device
    assert all(len(w.sharding.device_set) == 1 for w in vae_weights)
    assert not np.allclose(single[0], single[1])
    three = ours(num_images_per_prompt=3, key=key, parallel="pmap", **common).images  # padded to 8, trimmed
    np.testing.assert_allclose(three, single[:3], atol=1e-5)


def test_saved_pipeline_loads_in_diffusers(ours, ref, tmp_path):
    """Flax components saved in diffusers/transformers layout give diffusers the same images."""
    folder = ours.save_pretrained(tmp_path / "saved")
    again = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(sd_tiny.start_latents((1,) + LATENT, 12))
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(again(latents=lat, **common).images, ref(latents=lat, **common).images, atol=1e-6)


def test_outdated_scheduler_config_is_fixed_as_diffusers(ours, ref):
    old = type(ours.scheduler).from_config({**ours.scheduler.config, "steps_offset": 0, "clip_sample": True})
    pipe = StableDiffusionPipeline(**{**ours.components, "scheduler": old})
    ref_old = diffusers.DDIMScheduler.from_config({**ref.scheduler.config, "steps_offset": 0, "clip_sample": True})
    ref_pipe = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": ref_old})
    for name in ("steps_offset", "clip_sample"):
        assert pipe.scheduler.config[name] == ref_pipe.scheduler.config[name]
    assert pipe.scheduler.config["steps_offset"] == 1 and pipe.scheduler.config["clip_sample"] is False


def test_output_types(ours):
    lat = sd_tiny.start_latents((1,) + LATENT, 6)
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=lat)
    latents = ours(output_type="latent", guidance_scale=6.0, **common).images
    assert latents.shape == (1,) + LATENT
    pil = ours(output_type="pil", guidance_scale=6.0, return_dict=False, **common)[0]
    assert pil[0].size == (SIZE, SIZE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=sd_tiny.PROMPT), "key"),
        (dict(prompt=sd_tiny.PROMPT, key=jax.random.key(0), parallel="vmap"), "parallel"),
        (dict(prompt=sd_tiny.PROMPT, key=jax.random.key(0), height=30), "height"),
        (dict(prompt=sd_tiny.PROMPT, key=jax.random.key(0), output_type="pt"), "output_type"),
        (dict(prompt=sd_tiny.PROMPT, latents=np.zeros((2,) + LATENT, np.float32)), "latents"),
        (dict(prompt=None), "prompt"),
    ],
)
def test_bad_arguments_raise(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours(num_inference_steps=STEPS, **{"height": SIZE, "width": SIZE, **kwargs})


# --- image-conditioned pipelines -----------------------------------------------------------------------------


def _posterior_latents(pipe, pixels, key, stream):
    """Our scaled VAE posterior draw for image 0 of a call with ``key`` (what the pipeline encodes)."""
    keys = per_example_keys(key, pixels.shape[0])
    draw = vae_encode_sample(pipe.vae, jnp.asarray(pixels), keys, stream)
    return np.asarray(sd.scale_latents(draw, pipe.vae.config))


def _pixels(image):
    return 2.0 * image.transpose(0, 3, 1, 2) - 1.0  # (1, 3, H, W) in [-1, 1]


def _torch_noise(seed):
    return torch.randn((1,) + LATENT, generator=torch.Generator().manual_seed(seed))


def test_img2img_matches_diffusers(ours, ref, capsys):
    """diffusers gets our VAE posterior draw as a 4-channel (latent) image and draws the same start noise.
    The progress bar, fed from inside the compiled scan, starts at the strength's first call and ends full."""
    pipe = StableDiffusionImg2ImgPipeline(**ours.components)
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    ref_pipe.set_progress_bar_config(disable=True)
    image, key = sd_tiny.sample_image(), jax.random.key(3)
    latents4 = _posterior_latents(pipe, _pixels(image), key, 0)
    common = dict(prompt=sd_tiny.PROMPT, strength=0.7, num_inference_steps=3, guidance_scale=6.0, output_type="np")
    a = pipe(image=image, key=key, latents=_torch_noise(11).numpy(), **common).images
    b = ref_pipe(image=torch.from_numpy(latents4), generator=torch.Generator().manual_seed(11), **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert "3/3" in capsys.readouterr().err
    traced = pipe.trace_count
    other = pipe(image=sd_tiny.sample_image(seed=2), key=jax.random.key(4), **common).images
    assert pipe.trace_count == traced and not np.allclose(other, a)
    with pytest.raises(ValueError, match="key"):
        pipe(image=image, latents=_torch_noise(11).numpy(), **common)
    with pytest.raises(ValueError, match="strength"):
        pipe(image=image, key=key, **{**common, "strength": 1.5})


@pytest.mark.slow
def test_img2img_pmap_and_mesh_match_one_device(ours):
    """Per-image rows (image latents with per-key posterior draws) split over 8 devices give the same images."""
    pipe = StableDiffusionImg2ImgPipeline(**ours.components)
    pipe.set_progress_bar_config(disable=True)
    key = jax.random.key(9)
    common = dict(
        prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), strength=0.6, num_inference_steps=3,
        num_images_per_prompt=8, key=key, output_type="np",
    )  # fmt: skip
    single = pipe(**common).images
    pmapped = pipe(parallel="pmap", **common).images
    sharded = pipe(mesh=Mesh(np.array(jax.devices()), ("data",)), **common).images
    np.testing.assert_allclose(pmapped, single, atol=1e-5)
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    assert not np.allclose(single[0], single[1])  # each image has its own posterior draw and start noise


@pytest.mark.slow
def test_inpaint_matches_diffusers(tmp_path):
    """9-channel inpainting at strength 1; diffusers gets our masked-image posterior draw as masked_image_latents."""
    folder = sd_tiny.save_sd_pipeline(tmp_path / "inpaint", "StableDiffusionInpaintPipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionInpaintPipeline
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = sd_tiny.load_diffusers(folder)
    image, mask, key = sd_tiny.sample_image(), sd_tiny.sample_mask(), jax.random.key(5)
    masked = conditioning.masked_image(_pixels(image), mask.transpose(0, 3, 1, 2))
    masked_latents = _posterior_latents(pipe, masked, key, 1)
    noise = _torch_noise(12)
    common = dict(
        prompt=sd_tiny.PROMPT, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        guidance_scale=6.0, output_type="np",
    )  # fmt: skip
    a = pipe(key=key, latents=noise.numpy(), **common).images
    b = ref_pipe(masked_image_latents=torch.from_numpy(masked_latents), latents=noise, **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_inpaint_with_text_to_image_unet_matches_diffusers(ours, ref):
    """4-channel UNet: the known region is re-noised and kept after every step; diffusers gets our posterior
    draw as a 4-channel (latent) image."""
    pipe = StableDiffusionInpaintPipeline(**ours.components)
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    ref_pipe.set_progress_bar_config(disable=True)
    image, key = sd_tiny.sample_image(), jax.random.key(6)
    image_latents = _posterior_latents(pipe, _pixels(image), key, 0)
    noise = _torch_noise(14)
    common = dict(
        prompt=sd_tiny.PROMPT, mask_image=sd_tiny.sample_mask(), height=SIZE, width=SIZE, num_inference_steps=3,
        guidance_scale=6.0, output_type="np",
    )  # fmt: skip
    a = pipe(image=image, key=key, latents=noise.numpy(), **common).images
    unused = torch.zeros((1,) + LATENT)  # diffusers' masked-image latents (4-channel UNets do not read them)
    b = ref_pipe(image=torch.from_numpy(image_latents), masked_image_latents=unused, latents=noise, **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_instruct_pix2pix_matches_diffusers(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "pix2pix", "StableDiffusionInstructPix2PixPipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionInstructPix2PixPipeline
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = sd_tiny.load_diffusers(folder)
    noise = _torch_noise(13)
    common = dict(
        prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=STEPS, guidance_scale=6.0,
        image_guidance_scale=1.5, output_type="np",
    )  # fmt: skip
    a = pipe(latents=noise.numpy(), **common).images
    b = ref_pipe(latents=noise, **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    traced = pipe.trace_count
    weaker = pipe(latents=noise.numpy(), **{**common, "image_guidance_scale": 1.2}).images  # traced scalar
    assert pipe.trace_count == traced
    b_weaker = ref_pipe(latents=noise, **{**common, "image_guidance_scale": 1.2}).images
    np.testing.assert_allclose(weaker, b_weaker, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="in_channels"):  # an 8-channel UNet is neither 4 nor 4 + 5
        StableDiffusionInpaintPipeline(**pipe.components)(
            prompt=sd_tiny.PROMPT, image=common["image"], mask_image=sd_tiny.sample_mask(), key=jax.random.key(0)
        )


# --- ControlNet and the upscalers (each its own tiny checkpoint: slow) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(guess_mode=True, controlnet_conditioning_scale=0.7),
        dict(control_guidance_start=0.3, control_guidance_end=0.8),
    ],
    ids=["default", "guess-mode", "guidance-window"],
)
def test_controlnet_matches_diffusers(controlnet_folder, options):
    pipe, ref_pipe = controlnet_folder
    lat = sd_tiny.start_latents((1,) + LATENT, 8)
    common = dict(
        prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=3, guidance_scale=6.0,
        output_type="np", **options,
    )  # fmt: skip
    a = pipe(latents=lat, **common).images
    b = ref_pipe(latents=torch.from_numpy(lat), **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    folder = sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("cn") / "cn", "StableDiffusionControlNetPipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionControlNetPipeline
    pipe.set_progress_bar_config(disable=True)
    return pipe, sd_tiny.load_diffusers(folder)


@pytest.mark.slow
def test_x4_upscaler_matches_diffusers(tmp_path, monkeypatch):
    """diffusers draws the low-res image noise through ``randn_tensor``: it is given our draw for image 0."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as upscale_module

    folder = sd_tiny.save_sd_pipeline(tmp_path / "x4", "StableDiffusionUpscalePipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionUpscalePipeline
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = sd_tiny.load_diffusers(folder)
    key, low = jax.random.key(2), sd_tiny.sample_image(16, 16)
    draw_keys = jax.vmap(lambda k: jax.random.fold_in(k, LOW_RES_STREAM))(per_example_keys(key, 1))
    low_noise = np.asarray(per_example_normal(draw_keys, (3, 16, 16)))
    monkeypatch.setattr(upscale_module, "randn_tensor", lambda shape, **kwargs: torch.from_numpy(low_noise))
    lat = sd_tiny.start_latents((1,) + LATENT, 9)
    common = dict(prompt=sd_tiny.PROMPT, image=low, num_inference_steps=STEPS, guidance_scale=6.0, output_type="np")
    a = pipe(latents=lat, key=key, noise_level=20, **common).images
    b = ref_pipe(latents=torch.from_numpy(lat), noise_level=20, **common).images
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="noise_level"):
        pipe(latents=lat, key=key, noise_level=351, **common)


@pytest.mark.slow
def test_latent_upscaler_matches_diffusers(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "x2", "StableDiffusionLatentUpscalePipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionLatentUpscalePipeline
    pipe.set_progress_bar_config(disable=True)
    ref_pipe = sd_tiny.load_diffusers(folder)
    low = sd_tiny.start_latents((1, 4, 8, 8), 10)
    lat = sd_tiny.start_latents((1,) + LATENT, 11)
    common = dict(prompt=sd_tiny.PROMPT, num_inference_steps=STEPS, guidance_scale=6.0, output_type="np")
    a = pipe(image=low, latents=lat, **common).images
    b = ref_pipe(image=torch.from_numpy(low), latents=torch.from_numpy(lat), **common).images
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
