"""Scale-out of the Flax Stable Diffusion pipelines on 8 forced CPU devices (tests/conftest.py).

``parallel="pmap"`` and ``mesh=`` give the images of one device for typed (``jax.random.key``) and raw
(``jax.random.PRNGKey``, ``uint32[2]``) keys; 5 images on 8 devices are padded and trimmed; pmap weights are placed
once per pipeline; a new prompt, seed or guidance scale does not recompile; bf16 networks keep a float32 schedule.
Each path compiles its own program (~10-30 s on a shared CPU): every test reuses the module's shapes (5 images,
32x32 pixels, 2-3 steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_core.flax.pipelines import pipeline_utils
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.pipelines.stable_diffusion import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)
from tests.pipelines import sd_tiny

SIZE, STEPS, BATCH = 32, 2, 5  # 5 images on 8 devices: padded to 8, trimmed back
KEYS = {"typed": jax.random.key, "raw": jax.random.PRNGKey}  # jax.random.PRNGKey: raw uint32[2], diffusers-Flax's


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def ours(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _paths_agree(pipe, **call):
    """Single device with a typed key vs pmap and mesh with typed and raw keys: the same images (<= 1e-5)."""
    assert jax.local_device_count() == 8
    common = dict(num_images_per_prompt=BATCH, output_type="np", **call)
    single = pipe(key=jax.random.key(7), **common).images
    assert single.shape[0] == BATCH and np.isfinite(single).all()
    assert not np.allclose(single[0], single[1])  # each image has its own key
    for kind, make_key in KEYS.items():
        key = make_key(7)
        np.testing.assert_allclose(pipe(key=key, **common).images, single, atol=1e-5, err_msg=kind)
        pmapped = pipe(key=key, parallel="pmap", **common).images
        sharded = pipe(key=key, mesh=jax.make_mesh((8,), ("data",)), **common).images
        np.testing.assert_allclose(pmapped, single, atol=1e-5, err_msg=f"pmap, {kind} key")
        np.testing.assert_allclose(sharded, single, atol=1e-5, err_msg=f"mesh, {kind} key")
    return single


@pytest.mark.slow  # three programs (single, pmap, mesh): ~60 s here
def test_text_to_image_paths_agree_and_pmap_weights_are_placed_once(ours, monkeypatch):
    """txt2img on every path and key kind; then a new prompt, seed and guidance scale on pmap neither re-places the
    weights nor recompiles, and the compile time is reported."""
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0)
    _paths_agree(ours, **common)
    placements = []
    replicate = pipeline_utils._replicate
    monkeypatch.setattr(pipeline_utils, "_replicate", lambda *a: placements.append(a[1]) or replicate(*a))
    placed = ours._placed[("pmap", None)][1]
    traced = ours.trace_count
    new = dict(common, prompt="a red bicycle", guidance_scale=7.5)
    out = ours(key=jax.random.PRNGKey(8), parallel="pmap", num_images_per_prompt=BATCH, output_type="np", **new)
    assert placements == [] and ours._placed[("pmap", None)][1] is placed  # the same replicated weights
    assert ours.trace_count == traced and ours.last_compile_seconds == 0.0
    assert np.isfinite(out.images).all()


def test_compile_time_is_reported_and_new_options_do_not_recompile(ours, caplog):
    """One program (single device, 1 image): compiled once, then reused for a new prompt, seed and guidance."""
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    before = ours.trace_count
    with caplog.at_level("INFO", logger=pipeline_utils.__name__):
        ours(prompt=sd_tiny.PROMPT, key=jax.random.key(0), guidance_scale=6.0, **common)
    traced, first = ours.trace_count, ours.last_compile_seconds
    ours(prompt="a red bicycle", key=jax.random.PRNGKey(1), guidance_scale=7.5, **common)
    assert ours.trace_count == traced and ours.last_compile_seconds == 0.0
    if traced > before:  # this call compiled the program (not an earlier test of the module)
        assert first > 0.0 and "compiled the single denoising program" in caplog.text
    else:
        assert first == 0.0


@pytest.mark.slow  # one more program (~30 s)
def test_model_axis_splits_the_weights_and_gives_the_same_images(ours):
    """A (data 4, model 2) mesh: weights split over "model" (FSDP-style), batch over "data"; same images."""
    common = dict(
        prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0,
        num_images_per_prompt=BATCH, key=jax.random.PRNGKey(7), output_type="np",
    )  # fmt: skip
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    single = ours(**common).images
    sharded = ours(mesh=mesh, **common).images
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    placed = jax.tree.leaves(ours._placed[("mesh", mesh)][1])
    split = [w for w in placed if "model" in w.sharding.spec]
    assert len(split) > len(placed) // 2  # most weights are split (a few, e.g. odd-sized, stay replicated)
    w = max(split, key=lambda a: a.size)
    assert w.addressable_shards[0].data.size * 2 == w.size  # each device holds half of it


@pytest.mark.slow
def test_img2img_paths_agree(ours):
    pipe = StableDiffusionImg2ImgPipeline(**ours.components)
    pipe.set_progress_bar_config(disable=True)
    _paths_agree(pipe, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), strength=0.6, num_inference_steps=3)


@pytest.mark.slow
def test_inpaint_paths_agree(ours):
    """4-channel inpainting: per-image posterior draws, mask and known-region blend split over devices."""
    pipe = StableDiffusionInpaintPipeline(**ours.components)
    pipe.set_progress_bar_config(disable=True)
    _paths_agree(
        pipe, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), mask_image=sd_tiny.sample_mask(),
        height=SIZE, width=SIZE, strength=0.8, num_inference_steps=3,
    )  # fmt: skip


@pytest.mark.slow
def test_controlnet_paths_agree(tmp_path_factory):
    folder = sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("cn") / "cn", "StableDiffusionControlNetPipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionControlNetPipeline
    pipe.set_progress_bar_config(disable=True)
    _paths_agree(pipe, prompt=sd_tiny.PROMPT, image=sd_tiny.sample_image(), num_inference_steps=STEPS)


@pytest.mark.slow
def test_multi_controlnet_paths_agree(tmp_path_factory):
    """Two ControlNets: per-net scales (traced, shared by the batch) and per-image control rows split over devices."""
    pipe = DiffusionPipeline.from_pretrained(sd_tiny.save_multi_controlnet_pipeline(tmp_path_factory.mktemp("mcn")))
    pipe.set_progress_bar_config(disable=True)
    image = [sd_tiny.sample_image(seed=1), sd_tiny.sample_image(seed=2)]
    _paths_agree(
        pipe, prompt=sd_tiny.PROMPT, image=image, num_inference_steps=STEPS, controlnet_conditioning_scale=[0.5, 1.5]
    )


@pytest.mark.slow  # the pmap program of the module's shapes (~20 s when the txt2img test has not built it)
def test_pmap_takes_inputs_committed_to_one_device(ours):
    """Keys, prompt embeddings and latents a caller placed on one device (``jax.device_put(x, device)``) are split
    over the devices by ``parallel="pmap"``, as host arrays are; images equal one device's."""
    devices = jax.devices()
    key = jax.device_put(jax.random.key(7), devices[0])
    embeds = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(1, 77, 8)), jnp.float32), devices[0])
    latents = jax.device_put(jnp.asarray(sd_tiny.start_latents((BATCH, 4, SIZE // 2, SIZE // 2), 3)), devices[3])
    common = dict(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0, num_images_per_prompt=BATCH,
        output_type="np", prompt_embeds=embeds, negative_prompt_embeds=jnp.zeros_like(embeds),
    )  # fmt: skip
    single = ours(key=jax.random.key(7), **common).images
    np.testing.assert_allclose(ours(key=key, parallel="pmap", **common).images, single, atol=1e-5)
    with_latents = ours(key=jax.random.key(7), latents=latents, **common).images
    assert not np.allclose(with_latents, single)
    pmapped = ours(key=key, latents=latents, parallel="pmap", **common).images
    np.testing.assert_allclose(pmapped, with_latents, atol=1e-5)


def test_bad_key_parallel_and_mesh_raise(ours):
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS)
    for bad in (jnp.zeros(4, jnp.uint32), jnp.zeros(2, jnp.float32), jax.random.split(jax.random.key(0)), 7):
        with pytest.raises(ValueError, match="key must be one PRNG key"):
            ours(key=bad, **common)
    with pytest.raises(ValueError, match="parallel must be None or 'pmap'"):
        ours(key=jax.random.key(0), parallel="shard_map", **common)
    with pytest.raises(ValueError, match=r"mesh: axes must be \('data',\) .* got a mesh with axes \{'x': 2, 'y': 4\}"):
        ours(key=jax.random.key(0), mesh=jax.make_mesh((2, 4), ("x", "y")), **common)


def test_bf16_networks_keep_a_float32_schedule(sd_folder, ours):
    """dtype=bfloat16 networks; the scheduler state and sigma tables stay float32; images near the float32 ones."""
    half = DiffusionPipeline.from_pretrained(sd_folder, dtype=jnp.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert {w.dtype for w in jax.tree.leaves(nnx.state(half.unet, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    states = []
    make = half._state
    half._state = lambda run, batch: states.append(make(run, batch)) or states[-1]
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    lat = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2), 3)
    a = half(latents=lat, guidance_scale=6.0, **common).images
    b = ours(latents=lat, guidance_scale=6.0, **common).images
    floats = [
        leaf for state, _ in states for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert floats and {leaf.dtype for leaf in floats} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=3e-2)  # bf16 weights and activations: ~8 bits of mantissa
