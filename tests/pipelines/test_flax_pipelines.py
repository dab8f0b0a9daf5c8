"""Flax DDPM/DDIM pipelines: diffusers parity, one compiled scan per shape, pmap/mesh equal to one device."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from diffusion_core import schedulers
from diffusion_core.flax.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from diffusion_core.torch.pipelines import DiffusionPipeline as TorchPipeline
from tests.pipelines import tiny
from tests.pipelines.tiny import diffusers_reference_loop, swap_config

STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {
        "ddpm": tiny.save_diffusers_pipeline(root / "ddpm", unet=tiny.MINI_UNET),
        "ddim": tiny.save_diffusers_pipeline(
            root / "ddim", kind="DDIMPipeline", scheduler="DDIMScheduler", unet=tiny.MINI_UNET
        ),
    }


@pytest.fixture(scope="module")
def ddpm(folders):
    return DiffusionPipeline.from_pretrained(folders["ddpm"])


def _seed_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def test_ddim_pipeline_matches_diffusers(folders):
    ref = diffusers.DDIMPipeline.from_pretrained(folders["ddim"])
    expected = ref(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, output_type="np"
    )
    pipe = DiffusionPipeline.from_pretrained(folders["ddim"])
    assert type(pipe) is DDIMPipeline
    ours = pipe(batch_size=2, latents=_seed_noise((2, 3, 8, 8), 3), num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(ours.images, expected.images, atol=5e-3)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_scheduler_swap_matches_diffusers(folders, ddpm, name):
    latents = _seed_noise((2, 3, 8, 8), 5)
    ref = diffusers_reference_loop(folders["ddpm"], name, latents, STEPS)
    ddpm.scheduler = schedulers.from_config(swap_config(ddpm.scheduler, name))
    ours = ddpm(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=5e-3)
    traced = ddpm.trace_count
    again = ddpm(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    assert ddpm.trace_count == traced  # same shapes and options: the compiled program is reused
    np.testing.assert_array_equal(again, ours)


def test_backend_swap_gives_the_same_images(folders):
    latents = _seed_noise((2, 3, 8, 8), 7)
    flax_pipe = DiffusionPipeline.from_pretrained(folders["ddim"])
    torch_pipe = TorchPipeline.from_pretrained(folders["ddim"])
    a = flax_pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    b = torch_pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(a, b, atol=5e-3)


@pytest.mark.slow
def test_second_call_does_not_retrace_and_progress_is_reported(folders, capsys):
    pipe = DDPMPipeline.from_pretrained(folders["ddpm"])
    key = jax.random.key(0)
    first = pipe(batch_size=2, key=key, num_inference_steps=STEPS, output_type="np").images
    traced = pipe.trace_count
    assert traced == 1
    again = pipe(batch_size=2, key=key, num_inference_steps=STEPS, output_type="np").images
    assert pipe.trace_count == traced
    np.testing.assert_array_equal(first, again)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err
    other = pipe(batch_size=2, key=jax.random.key(1), num_inference_steps=STEPS, output_type="np").images
    assert pipe.trace_count == traced and not np.allclose(first, other)
    pipe.scheduler = schedulers.from_config(swap_config(pipe.scheduler, "EulerAncestralDiscreteScheduler"))
    pipe(batch_size=2, key=key, num_inference_steps=STEPS, output_type="np")
    assert pipe.trace_count == traced + 1  # a new scheduler is a new program


KEYS = {"typed": jax.random.key, "raw": jax.random.PRNGKey}  # jax.random.PRNGKey: raw uint32[2], diffusers-Flax's


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KEYS))
def test_pmap_and_mesh_give_the_single_device_images(ddpm, kind):
    """Typed and raw keys on every path; 5 images on 8 devices are padded and trimmed (pmap and mesh)."""
    assert jax.local_device_count() == 8
    ddpm.scheduler = schedulers.DDPMScheduler()  # stochastic: per-image keys must line up across devices
    key = KEYS[kind](42)
    common = dict(key=key, num_inference_steps=STEPS, output_type="np")
    single = ddpm(batch_size=8, **common).images
    np.testing.assert_array_equal(single, ddpm(batch_size=8, **{**common, "key": jax.random.key(42)}).images)
    for batch in (8, 5):
        pmapped = ddpm(batch_size=batch, parallel="pmap", **common).images
        sharded = ddpm(batch_size=batch, mesh=jax.make_mesh((8,), ("data",)), **common).images
        assert pmapped.shape == sharded.shape == (batch,) + single.shape[1:]
        np.testing.assert_allclose(pmapped, single[:batch], atol=1e-5)
        np.testing.assert_allclose(sharded, single[:batch], atol=1e-5)
    alone = ddpm(batch_size=1, **common).images
    np.testing.assert_allclose(alone[0], single[0], atol=1e-5)  # image i depends only on fold_in(key, i)


def test_bad_arguments_raise_clear_errors(ddpm):
    with pytest.raises(ValueError, match="key"):
        ddpm(batch_size=1, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="parallel"):
        ddpm(batch_size=1, key=jax.random.key(0), num_inference_steps=STEPS, parallel="vmap")
    for bad in (jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.int32), jax.random.split(jax.random.key(0)), 7):
        with pytest.raises(ValueError, match="key must be one PRNG key"):
            ddpm(batch_size=1, key=bad, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"mesh: .*axes \{'batch': 8\}"):
        ddpm(batch_size=8, key=jax.random.key(0), num_inference_steps=STEPS, mesh=jax.make_mesh((8,), ("batch",)))
    with pytest.raises(ValueError, match=r"mesh: .*axes \{'data': 4, 'x': 2\}"):
        ddpm(batch_size=8, key=jax.random.key(0), mesh=jax.make_mesh((4, 2), ("data", "x")))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with pytest.raises(ValueError, match="not both"):
        ddpm(batch_size=8, key=jax.random.key(0), num_inference_steps=STEPS, parallel="pmap", mesh=mesh)
    with pytest.raises(ValueError, match="output_type"):
        ddpm(batch_size=1, key=jax.random.key(0), num_inference_steps=STEPS, output_type="latent")


def test_flax_save_pretrained_loads_in_diffusers(folders, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(folders["ddim"])
    pipe.save_pretrained(tmp_path / "saved")
    ref = diffusers.DDIMPipeline.from_pretrained(tmp_path / "saved")
    expected = ref(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    ours = pipe(latents=_seed_noise((1, 3, 8, 8), 0), num_inference_steps=2, output_type="pil").images
    assert ours[0].size == (8, 8)
    np.testing.assert_allclose(np.asarray(ours[0]) / 255.0, expected[0], atol=1 / 255 + 5e-3)


def test_dtype_reaches_the_networks_and_components_can_be_passed(folders):
    import jax.numpy as jnp

    pipe = DiffusionPipeline.from_pretrained(folders["ddpm"], dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(pipe.unet.conv_in)} == {jnp.dtype(jnp.bfloat16)}
    sched = schedulers.UniPCMultistepScheduler()
    assert DDPMPipeline.from_pretrained(folders["ddpm"], scheduler=sched).scheduler is sched
