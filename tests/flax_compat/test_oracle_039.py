"""flax.compat against diffusers 0.39 itself (the last release with Flax): its Flax schedulers, and tiny Flax
pipelines it builds with random weights and saves (msgpack), loaded here and run with the same ``prng_seed``.

Runs only in the pinned environment of ``nox -s compat_oracle`` (diffusers 0.39, transformers 4.x, no torch;
see constraints-compat.txt), which sets DIFFUSION_CORE_COMPAT_ORACLE=1 and selects ``-m compat_oracle``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

if os.environ.get("DIFFUSION_CORE_COMPAT_ORACLE") != "1":
    pytest.skip("diffusers 0.39 oracle: run `nox -s compat_oracle`", allow_module_level=True)

import diffusers  # noqa: E402  (0.39 in that session)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax.jax_utils import replicate  # noqa: E402
from flax.training.common_utils import shard  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_core.flax import compat  # noqa: E402
from tests.tokenizer_fixtures import write_clip_vocab  # noqa: E402

pytestmark = pytest.mark.compat_oracle
ATOL = 5e-3  # the bound for images in [0, 1]
PROMPT = "A painting of a squirrel eating a burger"
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# 0.39's Flax blocks use GroupNorm(32): the smallest widths it can build
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    sample_size=32,
)
TEXT = dict(
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
    num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
)  # fmt: skip


def test_oracle_is_diffusers_039():
    assert diffusers.__version__.startswith("0.39.") and hasattr(diffusers, "FlaxStableDiffusionPipeline")


def _run_scheduler(scheduler, steps: int) -> np.ndarray:
    """0.39's scheduler loop over a fixed fake model; returns the final sample."""
    sample = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    state = scheduler.set_timesteps(scheduler.create_state(), steps, sample.shape)
    x = sample * state.init_noise_sigma
    for t in state.timesteps:
        model_input = scheduler.scale_model_input(state, x, t)
        eps = 0.3 * model_input + 0.01 * (t / 1000.0)
        out = scheduler.step(state, eps, t, x)
        x, state = out.prev_sample, out.state
    return np.asarray(x)


# LMS is left out: 0.39's Flax LMS step returns NaN (the compat class follows PyTorch, see the issue);
# DDPM too: 0.39's fixed_small variance fails on current JAX.
@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("FlaxDDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
        ("FlaxPNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),
        ("FlaxPNDMScheduler", dict(skip_prk_steps=False)),
        ("FlaxEulerDiscreteScheduler", dict()),
        ("FlaxDPMSolverMultistepScheduler", dict()),
        ("FlaxDPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver")),
    ],
)
def test_scheduler_full_loop_matches_039(name, config):
    ref = _run_scheduler(getattr(diffusers, name)(**SCHEDULE, **config), 10)
    ours = _run_scheduler(getattr(compat, name)(**SCHEDULE, **config), 10)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def _components(unet_in_channels: int) -> tuple[dict, dict]:
    """0.39 Flax components with random weights, and their params."""
    unet = diffusers.FlaxUNet2DConditionModel(**UNET, in_channels=unet_in_channels)
    vae = diffusers.FlaxAutoencoderKL(**VAE)
    text_encoder = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(**TEXT), seed=0)
    scheduler = diffusers.FlaxDDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    params = {
        "unet": unet.init_weights(jax.random.PRNGKey(0)),
        "vae": vae.init_weights(jax.random.PRNGKey(1)),
        "text_encoder": text_encoder.params,
        "scheduler": scheduler.create_state(),
    }
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler), params


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = write_clip_vocab(tmp_path_factory.mktemp("vocab"))
    return transformers.CLIPTokenizer.from_pretrained(vocab, model_max_length=77)


def _saved(kind: str, tokenizer, folder, unet_in_channels: int = 4, extra: tuple = ()):
    """0.39's pipeline ``kind`` with random weights, saved by 0.39 (msgpack) to ``folder``; ``(pipeline, params)``.

    ``extra``: more ``(name, model, params)`` components (a ControlNet).
    """
    components, params = _components(unet_in_channels)
    for name, model, model_params in extra:
        components[name], params[name] = model, model_params
    pipe = getattr(diffusers, kind)(**components, tokenizer=tokenizer, safety_checker=None, feature_extractor=None)
    pipe.save_pretrained(folder, params=params)
    assert (folder / "unet" / "diffusion_flax_model.msgpack").is_file()
    return pipe, params


def _picture(seed: int = 1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_txt2img_matches_039(tokenizer, tmp_path):
    ref_pipe, ref_params = _saved("FlaxStableDiffusionPipeline", tokenizer, tmp_path / "sd")
    pipe, params = compat.FlaxStableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    ids = pipe.prepare_inputs([PROMPT])  # batch 1: 0.39 crashed on larger batches with jit=False
    np.testing.assert_array_equal(ids, ref_pipe.prepare_inputs([PROMPT]))
    key = jax.random.PRNGKey(0)
    call = dict(num_inference_steps=3, height=32, width=32, guidance_scale=7.5)
    ref = ref_pipe(ids, ref_params, key, **call).images
    np.testing.assert_allclose(pipe(ids, params, key, **call).images, ref, atol=ATOL)
    # the HF blog's call: replicate / shard / one key per device, jit=True, over the 8 forced CPU devices
    n = jax.device_count()
    assert n == 8, "tests/conftest.py forces 8 CPU devices (XLA_FLAGS)"
    ids = shard(pipe.prepare_inputs([PROMPT] * n))
    keys = jax.random.split(key, n)
    ref = ref_pipe(ids, replicate(ref_params), keys, jit=True, **call).images
    np.testing.assert_allclose(pipe(ids, replicate(params), keys, jit=True, **call).images, ref, atol=ATOL)


def test_img2img_matches_039_with_the_same_seed(tokenizer, tmp_path):
    """The same ``prng_seed`` gives 0.39's image: start noise and VAE posterior noise drawn as 0.39 drew them."""
    ref_pipe, ref_params = _saved("FlaxStableDiffusionImg2ImgPipeline", tokenizer, tmp_path / "i2i")
    pipe, params = compat.FlaxStableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "i2i", safety_checker=None)
    ids, image = pipe.prepare_inputs([PROMPT], [_picture(1)])
    ref_ids, ref_image = ref_pipe.prepare_inputs([PROMPT], [_picture(1)])
    np.testing.assert_allclose(image, np.asarray(ref_image), atol=1e-6)
    key = jax.random.PRNGKey(3)
    ref = ref_pipe(ref_ids, ref_image, ref_params, key, strength=0.6, num_inference_steps=5).images
    np.testing.assert_allclose(
        pipe(ids, image, params, key, strength=0.6, num_inference_steps=5).images, ref, atol=ATOL
    )


def test_inpaint_matches_039_with_the_same_seed(tokenizer, tmp_path):
    ref_pipe, ref_params = _saved("FlaxStableDiffusionInpaintPipeline", tokenizer, tmp_path / "inp", 9)
    pipe, params = compat.FlaxStableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inp", safety_checker=None)
    mask_pixels = np.zeros((32, 32), np.uint8)
    mask_pixels[16:, 16:] = 255  # binary: 0.39 did not threshold its mask, we do
    mask = Image.fromarray(mask_pixels)
    ids, masked, binary = pipe.prepare_inputs([PROMPT], [_picture(4)], [mask])
    ref_ids, ref_masked, ref_binary = ref_pipe.prepare_inputs([PROMPT], [_picture(4)], [mask])
    np.testing.assert_allclose(masked, np.asarray(ref_masked), atol=1e-6)
    key = jax.random.PRNGKey(4)
    ref = ref_pipe(ref_ids, ref_binary, ref_masked, ref_params, key, num_inference_steps=3).images
    np.testing.assert_allclose(pipe(ids, binary, masked, params, key, num_inference_steps=3).images, ref, atol=ATOL)


def test_native_pipeline_loads_039_folder_and_matches(tokenizer, tmp_path):
    """The folder 0.39 saved (msgpack, model_index naming Flax classes) loads through the native
    ``diffusion_core.flax.DiffusionPipeline`` and gives 0.39's image for the same explicit latents (DDIM)."""
    from diffusion_core.flax import DiffusionPipeline

    ref_pipe, ref_params = _saved("FlaxStableDiffusionPipeline", tokenizer, tmp_path / "sd")
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["unet"][1] == "FlaxUNet2DConditionModel"
    native = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    native.set_progress_bar_config(disable=True)
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (1, 4, 16, 16)))
    call = dict(num_inference_steps=3, guidance_scale=7.5)
    ids = ref_pipe.prepare_inputs([PROMPT])
    ref = ref_pipe(ids, ref_params, jax.random.PRNGKey(0), latents=latents, **call).images
    ours = native(PROMPT, height=32, width=32, latents=latents, output_type="np", **call).images
    np.testing.assert_allclose(ours, np.asarray(ref), atol=ATOL)


def _controlnet() -> tuple:
    """0.39's Flax ControlNet with random weights; its conditioning embedding halves the size, as the tiny VAE."""
    net = diffusers.FlaxControlNetModel(
        **{k: v for k, v in UNET.items() if k not in ("up_block_types", "out_channels")},
        conditioning_embedding_out_channels=(16, 32),
    )
    params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(2))
    sample, cond = jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, 3, 32, 32))  # jax arrays: 0.39 wraps numpy timesteps
    context = jnp.zeros((1, 1, UNET["cross_attention_dim"]))
    rngs = {"params": params_rng, "dropout": dropout_rng}
    params = net.init(rngs, sample, jnp.ones((1,), jnp.int32), context, cond)["params"]
    # 0.39 zero-initialises the output convs (no effect until trained): give them random weights
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    leaves = [0.05 * jax.random.normal(k, x.shape) if not x.any() else x for k, x in zip(keys, leaves, strict=True)]
    return "controlnet", net, jax.tree_util.tree_unflatten(tree, leaves)


def test_controlnet_matches_039(tokenizer, tmp_path):
    kind = "FlaxStableDiffusionControlNetPipeline"
    ref_pipe, ref_params = _saved(kind, tokenizer, tmp_path / "cn", extra=(_controlnet(),))
    pipe, params = compat.FlaxStableDiffusionControlNetPipeline.from_pretrained(tmp_path / "cn", safety_checker=None)
    picture = _picture(6).resize((64, 64))  # 0.39 crops its control image to multiples of 64
    image = pipe.prepare_image_inputs(picture)
    np.testing.assert_allclose(image, np.asarray(ref_pipe.prepare_image_inputs(picture)), atol=1e-6)
    ids = pipe.prepare_text_inputs([PROMPT])
    np.testing.assert_array_equal(ids, ref_pipe.prepare_text_inputs([PROMPT]))
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, 4, 32, 32)))
    call = dict(num_inference_steps=3, guidance_scale=7.5, latents=latents, controlnet_conditioning_scale=0.8)
    key = jax.random.PRNGKey(0)
    ref = ref_pipe(ids, image, ref_params, key, **call).images
    np.testing.assert_allclose(pipe(ids, image, params, key, **call).images, np.asarray(ref), atol=ATOL)
    unguided = pipe(ids, image, params, key, **{**call, "controlnet_conditioning_scale": 0.0}).images
    assert np.abs(unguided - np.asarray(ref)).max() > 10 * ATOL  # the control image matters
