"""Scale-out of the Flax UnCLIPPipeline on 8 forced CPU devices (tests/conftest.py).

Each of the three stages (prior, decoder, super-resolution) is one cached compiled program over per-image rows:
``parallel="pmap"`` and ``mesh=`` give the images of one device (image b of stage s draws from
``fold_in(fold_in(key, s), b)``, whatever device runs it), stage by stage on the same inputs (see the test for why
not end to end across device counts); 5 images on 8 devices are padded and trimmed, and a new prompt, seed or
guidance scale reuses the programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_core.flax import DiffusionPipeline
from diffusion_core.flax.sampling import as_key
from diffusion_core.pipelines import unclip as uc
from tests.pipelines import unclip_tiny

BATCH = 5  # 5 images on 8 devices: padded to 8, trimmed back
# The tiny random-weight super-resolution UNets are ill-conditioned at a few pixels: on one device, moving their
# input by 1e-7 moves 3 of 61440 output values by up to 7e-3. The mesh program (XLA's partitioned HLO) rounds
# differently from the single-device one at that level, so those few pixels may differ by as much (measured: 4).
SUPER_RES_OUTLIERS = 8
STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = DiffusionPipeline.from_pretrained(unclip_tiny.save_unclip_pipeline(tmp_path_factory.mktemp("unclip") / "k"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, key, prompt=unclip_tiny.PROMPT, **kwargs):
    return pipe(prompt, key=key, num_images_per_prompt=BATCH, output_type="np", **STEPS, **kwargs).images


def test_new_prompt_seed_or_guidance_does_not_recompile(pipe):
    assert pipe.compile(BATCH, **STEPS) > 0.0  # ahead of time: the three stage programs
    traced = pipe.trace_count
    assert traced == 3
    first = _call(pipe, jax.random.key(0))
    assert pipe.trace_count == traced and pipe.last_compile_seconds == 0.0
    assert first.shape == (BATCH, 64, 64, 3) and np.isfinite(first).all()
    other = _call(pipe, jax.random.key(1), "a red bicycle", prior_guidance_scale=3.0, decoder_guidance_scale=5.0)
    assert pipe.trace_count == traced
    assert np.abs(other - first).max() > 1e-2
    with pytest.raises(ValueError, match="parallel"):
        _call(pipe, jax.random.key(0), parallel="vmap")
    with pytest.raises(ValueError, match="mesh"):
        _call(pipe, jax.random.key(0), mesh=jax.make_mesh((8,), ("batch",)))


def _assert_agree(got, want, what, outliers=0):
    """``got`` equals ``want`` within 1e-5 but for at most ``outliers`` elements, and those within 1e-2."""
    off = int((np.abs(got - want) > 1e-5).sum())
    assert off <= outliers, f"{what}: {off} of {got.size} elements differ by more than 1e-5"
    np.testing.assert_allclose(got, want, atol=1e-2, err_msg=what)


def _stages(pipe, request, key, where, given=None):
    """The three stage outputs (prior embeddings, decoder image, super-res image) run in ``where`` = (mode, mesh);
    with ``given`` (another run's outputs), each stage starts from the previous stage's output there."""
    embeds, hidden, mask = pipe._encode_text(request)
    prior = pipe._prior_stage(request, embeds, hidden, mask, key, None, where)
    previous = prior if given is None else jnp.asarray(given[0])
    decoder = pipe._decoder_stage(request, previous, embeds, hidden, mask, key, None, where)
    previous = decoder if given is None else jnp.asarray(given[1])
    return [np.asarray(a) for a in (prior, decoder, pipe._super_res_stage(request, previous, key, None, where))]


@pytest.mark.slow  # six more stage programs (pmap and mesh), ~15 s each on a shared CPU
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_single_pmap_and_mesh_give_the_same_images(pipe, make_key):
    """Every stage gives the same output (<= 1e-5) on one device, under pmap and on a mesh, from the same inputs.

    End to end, single device vs 8 differs by more: the tiny random-weight decoder is chaotic (a 5e-7 change of its
    input embeddings, the size of the CPU kernels' batch-size rounding, moves 2% of its pixels by up to 0.3), so
    across the device count the stages are compared on the same inputs; pmap and mesh (one image per device both)
    agree end to end. On the mesh a few super-resolution pixels may differ more (``SUPER_RES_OUTLIERS``).
    """
    assert jax.local_device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    request = uc.unclip_request(pipe._configs(), unclip_tiny.PROMPT, num_images_per_prompt=BATCH, **STEPS)
    key = as_key(make_key(7))
    single = _stages(pipe, request, key, ("single", None))
    pipe.compile(BATCH, parallel="pmap", **STEPS)  # ahead of time: the pmap calls below do not trace
    traced = pipe.trace_count
    assert single[2].shape == (BATCH, 3, 64, 64) and not np.allclose(single[2][0], single[2][1])
    for name, got, want in zip(uc.STAGES, _stages(pipe, request, key, ("pmap", None), single), single, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"pmap: {name}")
    assert pipe.trace_count == traced  # compiled ahead of time
    for name, got, want in zip(uc.STAGES, _stages(pipe, request, key, ("mesh", mesh), single), single, strict=True):
        _assert_agree(got, want, f"mesh: {name}", outliers=SUPER_RES_OUTLIERS if name == "super_res" else 0)
    pmapped = _call(pipe, make_key(7), parallel="pmap")
    _assert_agree(_call(pipe, make_key(7), mesh=mesh), pmapped, "mesh vs pmap", outliers=SUPER_RES_OUTLIERS)
    traced = pipe.trace_count
    _call(pipe, make_key(8), "a red bicycle", parallel="pmap", prior_guidance_scale=2.0)  # programs reused
    _call(pipe, make_key(8), mesh=mesh, decoder_guidance_scale=3.0)
    assert pipe.trace_count == traced
