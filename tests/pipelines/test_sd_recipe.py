"""The framework-neutral SD recipe on its own: numpy == torch for the array functions, input checks, image prep."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core import schedulers
from diffusion_core.pipelines import sd_control, sd_image, sd_recipes
from diffusion_core.pipelines import stable_diffusion as sd
from tests.pipelines import sd_tiny

RNG = np.random.default_rng(0)


def _both(fn, *arrays, **kwargs):
    """``fn`` on numpy inputs and on the same values as torch tensors; returns both results as numpy."""
    a = fn(*arrays, **kwargs)
    b = fn(*[torch.from_numpy(x) for x in arrays], **kwargs)
    return np.asarray(a), b.numpy()


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_embeddings_input_and_combine_agree_across_namespaces(parts):
    g = sd.Guidance(7.5, 0.5 if parts == 2 else 0.0, 1.5 if parts == 3 else None, parts)
    pos, neg = RNG.standard_normal((2, 5, 4), dtype=np.float32), RNG.standard_normal((2, 5, 4), dtype=np.float32)
    a, b = _both(lambda p, n: sd.batch_embeddings(p, n, 3, g), pos, neg)
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
    assert a.shape == (parts * 6, 5, 4)
    np.testing.assert_array_equal(a[(parts - 1) * 6 if parts == 2 else 0], pos[0])  # the positive rows, per image
    np.testing.assert_array_equal(a[1 if parts != 2 else 7], pos[0])
    x = RNG.standard_normal((6, 4, 2, 2), dtype=np.float32)
    extra = RNG.standard_normal((parts * 6, 1, 2, 2), dtype=np.float32)
    a, b = _both(lambda x_, e: sd.model_input(x_, g, e), x, extra)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (parts * 6, 5, 2, 2)
    out = RNG.standard_normal((parts * 6, 4, 2, 2), dtype=np.float32)
    a, b = _both(lambda o: sd.combine(o, g), out)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cfg_combination_formula():
    g = sd.guidance(3.0, 0.0, {"time_cond_proj_dim": None})
    uncond, cond = np.ones((1, 2), np.float32), np.full((1, 2), 2.0, np.float32)
    np.testing.assert_allclose(sd.combine(np.concatenate([uncond, cond]), g), np.full((1, 2), 4.0))
    assert sd.guidance(1.0, 0.0, {}).parts == 1
    assert sd.guidance(5.0, 0.0, {"time_cond_proj_dim": 256}).parts == 1  # guidance-embedded (LCM) UNets
    assert sd.guidance(5.0, 0.0, {}, image_guidance_scale=0.9).parts == 1
    assert sd.guidance(5.0, 0.0, {}, image_guidance_scale=1.0).parts == 3


def test_sizes_shapes_and_latent_scaling():
    unet, vae = {"sample_size": 64}, {"block_out_channels": (1, 2, 3, 4), "scaling_factor": 0.5, "shift_factor": 0.1}
    assert sd.vae_scale_factor(vae) == 8
    assert sd.resolve_size(None, None, unet, vae) == (512, 512)
    assert sd.resolve_size(256, 384, unet, vae) == (256, 384)
    assert sd.latent_shape(2, 4, 256, 384, 8) == (2, 4, 32, 48)
    with pytest.raises(ValueError, match="width must be divisible by 8"):
        sd.resolve_size(256, 100, unet, vae)
    z = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(sd.scale_latents(sd.unscale_latents(z, vae), vae), z, atol=1e-6)
    np.testing.assert_allclose(sd.unscale_latents(z, {"scaling_factor": 0.5}), 2 * z)


def test_prompt_checks_and_negative_texts():
    assert sd.check_prompt_inputs(["a", "b"], None, None, None) == 2
    assert sd.check_prompt_inputs(None, None, np.zeros((3, 7, 8)), None) == 3
    assert sd.negative_texts(None, 2) == ["", ""] and sd.negative_texts("x", 2) == ["x", "x"]
    with pytest.raises(ValueError, match="negative_prompt_embeds must have the shape"):
        sd.check_prompt_inputs(None, None, np.zeros((1, 7, 8)), np.zeros((1, 6, 8)))
    with pytest.raises(ValueError, match="prompt must be a str"):
        sd.check_prompt_inputs([], None, None, None)
    assert sd.step_kwargs(schedulers.from_config({"_class_name": "DDIMScheduler"}), 0.3) == {"eta": 0.3}
    assert sd.step_kwargs(schedulers.from_config({"_class_name": "EulerDiscreteScheduler"}), 0.3) == {}


def test_image_and_mask_preprocessing_pil_equals_numpy():
    pixels = RNG.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    as_np = sd_image.preprocess_image(pixels.astype(np.float32) / 255, 2)
    as_pil = sd_image.preprocess_image(Image.fromarray(pixels), 2)
    np.testing.assert_allclose(as_pil, as_np, atol=1e-6)
    assert as_np.shape == (1, 3, 16, 18) and as_np.min() >= -1 and as_np.max() <= 1
    odd = sd_image.preprocess_image(Image.fromarray(pixels[:15, :17]), 2)
    assert odd.shape == (1, 3, 14, 16)  # rounded down to the VAE scale factor
    mask = sd_image.preprocess_mask(Image.fromarray((pixels[..., 0] > 127).astype(np.uint8) * 255), 2, 16, 18)
    assert mask.shape == (1, 1, 16, 18) and set(np.unique(mask)) <= {0.0, 1.0}
    control = sd_image.preprocess_control_image(pixels.astype(np.float32) / 255, 2)
    np.testing.assert_allclose(control, (as_np + 1) / 2, atol=1e-6)


def test_controlnet_batches_and_guess_mode():
    image = RNG.random((1, 3, 4, 4)).astype(np.float32)
    a, b = _both(lambda im: sd_control.control_image_batch(im, 4, 2, 2, False), image)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 3, 4, 4)
    assert sd_control.control_image_batch(image, 4, 2, 2, True).shape == (4, 3, 4, 4)
    down, mid = [np.ones((2, 3), np.float32)], np.ones((2, 1), np.float32)
    padded, mid2 = sd_control.guess_mode_residuals(down, mid, 2)
    np.testing.assert_array_equal(padded[0], np.concatenate([np.zeros((2, 3)), np.ones((2, 3))]))
    assert mid2.shape == (4, 1)


def test_inpaint_pix2pix_and_upscaler_inputs():
    mask, latents = np.ones((2, 1, 2, 2), np.float32), RNG.standard_normal((2, 4, 2, 2)).astype(np.float32)
    a, b = _both(lambda m, z: sd_image.inpaint_extra(m, z, 2), mask, latents)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 5, 2, 2)
    three = sd_image.pix2pix_extra(latents, 3)
    np.testing.assert_array_equal(three[4:], 0.0)
    upscale = sd_recipes.UpscaleRecipe.__new__(sd_recipes.UpscaleRecipe)  # the hooks only, no components
    g = sd.Guidance(9.0, 0.0, None, 2)
    extra = upscale._extra({"low_res": latents}, g)
    labels = upscale._unet_kwargs({"low_res": latents}, g, {"noise_level": 20.0})["class_labels"]
    assert extra.shape == (4, 4, 2, 2) and labels.tolist() == [20] * 4
    np.testing.assert_array_equal(extra[2:], latents)
    a, b = _both(lambda z: upscale._unet_kwargs({"low_res": z}, g, {"noise_level": 20.0})["class_labels"], latents)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="in_channels=9"):
        sd_image.check_unet_channels({"in_channels": 4}, 4, 5, "StableDiffusionInpaintPipeline")


def test_encode_prompt_pairs_pads_negatives_and_concatenates_per_namespace():
    tokenizer, calls = sd_tiny.clip_tokenizer(), []

    def encode_pair(ids):  # (B, L) ids -> hidden (B, L, 2), pooled (B, 2)
        calls.append(ids.shape)
        hidden = torch.from_numpy(np.stack([ids, -ids], axis=-1).astype(np.float32))
        return hidden, hidden[:, 0]

    hidden, pooled = sd.encode_prompt_pairs(encode_pair, tokenizer, ["a cat", "a dog"], None, (None,) * 4, True)
    assert hidden.shape == (4, calls[0][1], 2) and pooled.shape == (4, 2) and calls[1] == calls[0]
    np.testing.assert_array_equal(hidden[:2].numpy(), hidden[:2].numpy()[:1].repeat(2, 0))  # two empty negatives
    assert not np.array_equal(hidden[2].numpy(), hidden[3].numpy())
    given = tuple(RNG.standard_normal(shape, dtype=np.float32) for shape in [(1, 3, 2), (1, 2), (1, 3, 2), (1, 2)])
    calls.clear()
    hidden, pooled = sd.encode_prompt_pairs(encode_pair, tokenizer, None, None, given, True)
    assert not calls  # given embeddings are used as they are, in numpy
    np.testing.assert_array_equal(hidden, np.concatenate([given[2], given[0]]))
    np.testing.assert_array_equal(pooled, np.concatenate([given[3], given[1]]))
    hidden, pooled = sd.encode_prompt_pairs(encode_pair, tokenizer, None, None, given, False)
    assert hidden is given[0] and pooled is given[1]


def test_updated_scheduler_fixes_outdated_options_only():
    current = schedulers.from_config({"_class_name": "DDIMScheduler", "steps_offset": 1, "clip_sample": False})
    assert sd.updated_scheduler(current, ("steps_offset", "clip_sample"), "P") is current
    old = schedulers.from_config({"_class_name": "DDIMScheduler", "steps_offset": 0, "clip_sample": True})
    fixed = sd.updated_scheduler(old, ("steps_offset",), "P")
    assert type(fixed) is type(old) and fixed.config["steps_offset"] == 1 and fixed.config["clip_sample"] is True
    assert sd.SD_COMPONENTS[:5] == ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    assert set(sd.SD_OPTIONAL) < set(sd.SD_COMPONENTS)


TEXT = {"num_hidden_layers": 2}


def test_upscaler_and_inpaint_argument_checks():
    assert sd_image.upscaler_vae_config({"scaling_factor": 0.18215, "x": 1}) == {"scaling_factor": 0.08333, "x": 1}
    assert sd_image.upscaler_max_noise_level({}) == 350
    assert sd_image.upscaler_max_noise_level({"max_noise_level": 9}) == 9
    embeds = (np.zeros((1, 3, 2)), None, None, None)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        sd_image.check_latent_upscaler_call(None, None, embeds, 1, 9.0, 2, "np", TEXT)
    with pytest.raises(ValueError, match="image"):
        sd_image.check_latent_upscaler_call("a", None, (None,) * 4, None, 9.0, 2, "np", TEXT)
    batch, prompt, g = sd_image.check_latent_upscaler_call(["a", "b"], None, (None,) * 4, 1, 0.0, 2, "np", TEXT)
    assert batch == 2 and prompt == ["", ""] and g.parts == 1  # guidance_scale 0: empty prompts, as diffusers
    batch, prompt, g = sd_image.check_latent_upscaler_call(["a", "b"], None, (None,) * 4, 1, 9.0, 2, "np", TEXT)
    assert batch == 2 and prompt == ["a", "b"] and g.parts == 2
    with pytest.raises(ValueError, match="mask_image"):
        sd_image.require_image(None, "mask_image")
    unet, vae = {"in_channels": 5, "sample_size": 8}, {"latent_channels": 4, "block_out_channels": [8, 8]}
    image, mask = RNG.random((16, 16, 3), dtype=np.float32), (RNG.random((16, 16)) > 0.5).astype(np.float32)
    with pytest.raises(ValueError, match="in_channels=9"):
        sd_image.inpaint_inputs(unet, vae, image, mask, (16, 16), (None, 2, 1.0), "P")
    ddim = schedulers.from_config({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="strength"):
        sd_image.inpaint_inputs({**unet, "in_channels": 4}, vae, image, mask, (16, 16), (ddim, 2, 0.1), "P")
    nine = {**unet, "in_channels": 9}
    blend, size, pixels, mask_out = sd_image.inpaint_inputs(nine, vae, image, mask, (None, None), (ddim, 2, 1.0), "P")
    assert not blend and size == (16, 16) and pixels.shape == (1, 3, 16, 16) and mask_out.shape == (1, 1, 16, 16)


def test_sd_request_checks_once_and_is_frozen():
    import dataclasses

    from diffusion_core.pipelines import sd_recipe

    text, unet = {"num_hidden_layers": 2}, {"time_cond_proj_dim": None}
    req = sd_recipe.sd_request(
        text, unet, prompt=["a", "b"], num_images_per_prompt=3, num_inference_steps=4, guidance_scale=7.0
    )
    assert req.prompts == 2 and req.batch == 6 and req.guidance.parts == 2 and req.scalars == (("guidance_scale", 7.0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.eta = 1.0
    for bad, match in [
        (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
        (dict(clip_skip=2), "clip_skip must be None or an int in"),
        (dict(guidance_rescale=2.0), "guidance_rescale must be in"),
        (dict(output_type="jpg"), "output_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            sd_recipe.sd_request(text, unet, **{"prompt": "a", "num_inference_steps": 2, "guidance_scale": 7.0, **bad})
    pix = sd_recipe.sd_request(
        text, unet, prompt="a", num_inference_steps=2, guidance_scale=7.0, image_guidance_scale=1.5
    )
    assert pix.guidance.parts == 3 and dict(pix.scalars) == {"guidance_scale": 7.0, "image_guidance_scale": 1.5}
    assert "generator" not in sd_recipe.REQUEST_ARGUMENTS and "image_guidance_scale" in sd_recipe.REQUEST_ARGUMENTS


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpaint_hooks_agree_across_namespaces(strength):
    """The start and the 4-channel blend hook on numpy and torch: what both loop drivers run."""
    recipe = sd_recipes.InpaintRecipe.__new__(sd_recipes.InpaintRecipe)  # the hooks only, no components
    recipe.scheduler = schedulers.from_config({"_class_name": "DDIMScheduler"})
    shape = (2, 4, 3, 3)
    arrays_np = {k: RNG.standard_normal(shape).astype(np.float32) for k in ("noise", "image_latents")}
    arrays_np["mask"] = (RNG.random((2, 1, 3, 3)) > 0.5).astype(np.float32)
    x = RNG.standard_normal(shape).astype(np.float32)
    results = []
    for wrap in (np.asarray, torch.from_numpy):
        inputs = {k: wrap(v) for k, v in arrays_np.items()}
        state, first = recipe._schedule(4, inputs["noise"], {"strength": strength})
        opts = {"strength": strength, "first": first}
        start = recipe._start(inputs, state, opts)
        stepped, state = recipe.scheduler.step(state, wrap(x), start)
        blended = recipe._post_step(inputs, opts)(stepped, state)
        results.append([np.asarray(start), np.asarray(stepped), np.asarray(blended)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    start, stepped, blended = results[0]
    if strength == 1.0:  # pure noise, as diffusers
        np.testing.assert_allclose(start, arrays_np["noise"] * float(state.init_noise_sigma), rtol=1e-6)
    repaint = np.broadcast_to(arrays_np["mask"] == 1, shape)
    np.testing.assert_array_equal(blended[repaint], stepped[repaint])  # the new sample inside the mask
    assert np.abs(blended[~repaint] - stepped[~repaint]).min() > 0  # the re-noised original outside it
    assert recipe._extra(arrays_np, sd.Guidance(7.0, parts=2)) is None  # 4-channel UNet: no extra channels
