"""PyTorch Stable Diffusion pipelines against diffusers 0.42.1 on tiny random-weight checkpoints (real CLIP vocab).

Every parity test loads a diffusers-saved folder with our ``DiffusionPipeline.from_pretrained`` and compares
pixels (``output_type="np"``) against diffusers run on the same folder with the same start latents.
"""

import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch

from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import StableDiffusionPipeline
from tests.pipelines import sd_tiny, tiny

ATOL = 2e-3
SIZE = 32  # pixels; latents are (B, 4, 16, 16) with the tiny VAE (scale factor 2)
STEPS = 2
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


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


def _both(ours_pipe, ref_pipe, batch=1, **kwargs):
    """Run both pipelines with the same numpy start latents; returns (ours, reference) np images."""
    lat = sd_tiny.start_latents((batch, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", **kwargs)
    a = ours_pipe(latents=lat, **common).images
    b = ref_pipe(latents=torch.from_numpy(lat), **common).images
    return a, b


def test_loads_as_stable_diffusion_pipeline(ours):
    assert type(ours) is StableDiffusionPipeline
    assert ours.safety_checker is None and ours.feature_extractor is None and ours.image_encoder is None
    assert ours.settings == {"requires_safety_checker": False}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_matches_diffusers_per_scheduler(ours, ref, scheduler):
    restore = sd_tiny.swap_schedulers(ours, ref, scheduler)
    try:
        a, b = _both(ours, ref, prompt=sd_tiny.PROMPT, guidance_scale=6.0)
    finally:
        restore()
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "scheduler, steps",
    [
        ("PNDMScheduler", 4),
        ("LMSDiscreteScheduler", 3),
        ("HeunDiscreteScheduler", 2),
        ("EulerAncestralDiscreteScheduler", 3),
        ("KDPM2DiscreteScheduler", 2),
        ("DEISMultistepScheduler", 3),
        ("DPMSolverSinglestepScheduler", 3),
        ("DDPMScheduler", 3),
        ("LCMScheduler", 3),
    ],
)
def test_other_schedulers_match_diffusers(ours, ref, scheduler, steps):
    """Stochastic ones draw their step noise from the same torch generator as diffusers."""
    restore = sd_tiny.swap_schedulers(ours, ref, scheduler)
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=steps, output_type="np", guidance_scale=6.0)
    try:
        a = ours(sd_tiny.PROMPT, latents=lat, generator=torch.Generator().manual_seed(0), **common).images
        b = ref(sd_tiny.PROMPT, latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(0), **common)
    finally:
        restore()
    np.testing.assert_allclose(a, b.images, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(guidance_scale=1.0),  # CFG off: one UNet batch
        dict(guidance_scale=6.0, negative_prompt=sd_tiny.NEGATIVE),
        dict(guidance_scale=7.5, guidance_rescale=0.7),
    ],
    ids=["no-cfg", "negative-prompt", "guidance-rescale"],
)
def test_guidance_options_match_diffusers(ours, ref, kwargs):
    a, b = _both(ours, ref, prompt=sd_tiny.PROMPT, **kwargs)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_prompt_list_with_images_per_prompt_matches_diffusers(ours, ref):
    prompts = [sd_tiny.PROMPT, "an oil painting of a cat"]
    negatives = [sd_tiny.NEGATIVE, ""]
    a, b = _both(ours, ref, batch=4, prompt=prompts, negative_prompt=negatives, num_images_per_prompt=2)
    assert a.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(a[0] - a[2]).max() > 1e-3  # the two prompts differ


def _reference_embeddings(ref_pipe, texts, clip_skip=None):
    ids = ref_pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref_pipe.text_encoder(ids.input_ids, output_hidden_states=True)
        if clip_skip is None:
            return out.last_hidden_state
        return ref_pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def test_prompt_embeds_numpy_and_torch_match_diffusers(ours, ref):
    pos = _reference_embeddings(ref, [sd_tiny.PROMPT])
    neg = _reference_embeddings(ref, [sd_tiny.NEGATIVE])
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", guidance_scale=6.0)
    a_np = ours(prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(), latents=lat, **common).images
    a_pt = ours(prompt_embeds=pos, negative_prompt_embeds=neg, latents=lat, **common).images
    b = ref(prompt_embeds=pos, negative_prompt_embeds=neg, latents=torch.from_numpy(lat), **common).images
    from_text = ours(prompt=sd_tiny.PROMPT, negative_prompt=sd_tiny.NEGATIVE, latents=lat, **common).images
    only_pos = ours(prompt_embeds=pos, latents=lat, **common).images  # negative: "" encoded to the same length
    b_only_pos = ref(prompt_embeds=pos, latents=torch.from_numpy(lat), **common).images
    np.testing.assert_allclose(a_np, b, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a_pt, a_np, atol=1e-6, rtol=0)
    np.testing.assert_allclose(from_text, a_np, atol=1e-5, rtol=0)
    np.testing.assert_allclose(only_pos, b_only_pos, atol=ATOL, rtol=0)


def test_clip_skip_matches_diffusers_recipe(ours, ref):
    """diffusers 0.42.1 reads ``text_encoder.text_model`` (gone in transformers 5), so the reference gets
    the clip-skipped embeddings its way (hidden_states[-(k + 1)] -> final_layer_norm) as prompt_embeds."""
    pos = _reference_embeddings(ref, [sd_tiny.PROMPT], clip_skip=1)
    neg = _reference_embeddings(ref, [""])
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", guidance_scale=6.0)
    a = ours(prompt=sd_tiny.PROMPT, clip_skip=1, latents=lat, **common).images
    b = ref(prompt_embeds=pos, negative_prompt_embeds=neg, latents=torch.from_numpy(lat), **common).images
    no_skip = ours(prompt=sd_tiny.PROMPT, latents=lat, **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(a - no_skip).max() > 1e-4


def test_generators_per_image_match_diffusers(ours, ref):
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", num_images_per_prompt=2)
    a = ours(sd_tiny.PROMPT, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **common).images
    b = ref(sd_tiny.PROMPT, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **common).images
    single = ours(sd_tiny.PROMPT, generator=torch.Generator().manual_seed(0), **common).images
    b_single = ref(sd_tiny.PROMPT, generator=torch.Generator().manual_seed(0), **common).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    np.testing.assert_allclose(single, b_single, atol=ATOL, rtol=0)


def test_output_types_and_return_dict(ours, ref):
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=lat)
    arr = ours(sd_tiny.PROMPT, output_type="np", **common).images
    pil = ours(sd_tiny.PROMPT, output_type="pil", **common).images
    (latent,) = ours(sd_tiny.PROMPT, output_type="latent", return_dict=False, **common)
    ref_latent = ref(sd_tiny.PROMPT, output_type="latent", **{**common, "latents": torch.from_numpy(lat)}).images
    assert len(pil) == 1 and pil[0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    assert isinstance(latent, torch.Tensor) and latent.shape == (1, 4, SIZE // 2, SIZE // 2)
    np.testing.assert_allclose(latent.numpy(), ref_latent.numpy(), atol=1e-4, rtol=0)


def test_step_callback_sees_every_model_call(ours):
    seen = []
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    ours(
        sd_tiny.PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        latents=lat,
        output_type="latent",
        callback_on_step_end=lambda pipe, i, t, kw: seen.append((i, int(t), tuple(kw["latents"].shape))),
    )
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, SIZE // 2, SIZE // 2)
    assert seen[0][1] > seen[1][1] > seen[2][1]


def test_hub_style_offline_load(sd_folder, ours, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, "tiny/sd", sd_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    pipe = DiffusionPipeline.from_pretrained("tiny/sd")
    pipe.set_progress_bar_config(disable=True)
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=lat, output_type="np")
    assert type(pipe) is StableDiffusionPipeline
    np.testing.assert_array_equal(pipe(sd_tiny.PROMPT, **common).images, ours(sd_tiny.PROMPT, **common).images)


def test_saved_pipeline_loads_in_diffusers(ours, ref, tmp_path):
    ours.save_pretrained(tmp_path / "saved")
    again = sd_tiny.load_diffusers(tmp_path / "saved")
    a, b = _both(ours, again, prompt=sd_tiny.PROMPT, guidance_scale=6.0)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "prompt, prompt_embeds"),
        (dict(prompt="a", prompt_embeds=np.zeros((1, 77, 8), np.float32)), "not both"),
        (dict(prompt=3), "prompt must be"),
        (dict(prompt="a", negative_prompt=["x", "y"]), "negative_prompt"),
        (dict(prompt="a", height=30), "height must be divisible"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt="a", output_type="pt"), "output_type"),
        (dict(prompt="a", clip_skip=2), "clip_skip"),
        (dict(prompt="a", guidance_rescale=1.5), "guidance_rescale"),
        (dict(prompt="a", eta=-1.0), "eta"),
        (dict(prompt="a", latents=np.zeros((1, 4, 8, 8), np.float32)), "latents must have shape"),
        (dict(prompt="a", num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_arguments_raise(ours, kwargs, match):
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)


def test_ddim_eta_draws_step_noise_like_diffusers(ours, ref):
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np", eta=0.7)
    a = ours(sd_tiny.PROMPT, latents=lat, generator=torch.Generator().manual_seed(1), **common).images
    b = ref(sd_tiny.PROMPT, latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(1), **common).images
    deterministic = ours(sd_tiny.PROMPT, latents=lat, **{**common, "eta": 0.0}).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(a - deterministic).max() > 1e-3


def test_custom_timesteps_and_sigmas_match_diffusers(ours, ref):
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, output_type="np")
    with pytest.raises(ValueError, match="timesteps: DDIMScheduler does not accept custom timesteps"):
        ours(sd_tiny.PROMPT, latents=lat, timesteps=[901, 500, 101], **common)  # diffusers' DDIM refuses too
    restore = sd_tiny.swap_schedulers(ours, ref, "EulerDiscreteScheduler")
    try:
        results = []
        for custom in (dict(timesteps=[901, 500, 101]), dict(sigmas=[10.0, 3.0, 0.5])):
            a = ours(sd_tiny.PROMPT, latents=lat, **custom, **common).images
            b = ref(sd_tiny.PROMPT, latents=torch.from_numpy(lat), **custom, **common).images
            results.append((a, b))
    finally:
        restore()
    for a, b in results:
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_outdated_scheduler_config_is_fixed_like_diffusers(sd_folder, tmp_path, caplog):
    folder = tmp_path / "old"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "steps_offset": 0, "clip_sample": True}))
    ours_old = DiffusionPipeline.from_pretrained(folder)
    ours_old.set_progress_bar_config(disable=True)
    assert ours_old.scheduler.config["steps_offset"] == 1 and ours_old.scheduler.config["clip_sample"] is False
    assert "outdated scheduler config" in caplog.text
    a, b = _both(ours_old, sd_tiny.load_diffusers(folder), prompt=sd_tiny.PROMPT)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_callback_on_step_end_can_replace_latents(sd_folder):
    """A callback returning {"latents": ...} replaces the sample (diffusers' callback_on_step_end contract)."""
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    seen = []

    def zero_after_first(p, i, t, kw):
        seen.append(i)
        return {"latents": torch.zeros_like(kw["latents"])} if i == 0 else None

    kw = dict(
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        latents=sd_tiny.start_latents((1, 4, 32, 32), 0),
    )
    base = pipe(sd_tiny.PROMPT, **kw).images
    out = pipe(sd_tiny.PROMPT, callback_on_step_end=zero_after_first, **kw).images
    assert seen == [0, 1]
    assert not torch.allclose(torch.as_tensor(np.asarray(base)), torch.as_tensor(np.asarray(out)))
