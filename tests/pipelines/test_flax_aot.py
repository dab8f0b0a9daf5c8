"""Ahead-of-time compilation for serving (``pipe.compile``): the first real call of that shape does not compile.

``compile`` lowers and compiles the denoising program without running it (and warms the text encoder / VAE);
afterwards a call with the same shapes and any prompt, seed or guidance scale neither traces nor compiles it.
"""

import jax
import numpy as np
import pytest

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import sd_tiny, tiny

SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    pipe = DiffusionPipeline.from_pretrained(sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_call_after_compile(pipe, compile_kwargs, call_kwargs):
    traced = pipe.trace_count
    seconds = pipe.compile(**compile_kwargs)
    assert seconds > 0.0 and pipe.trace_count == traced + 1  # traced and compiled once, not run
    out = pipe(**call_kwargs)
    assert pipe.trace_count == traced + 1 and pipe.last_compile_seconds == 0.0
    return out


def test_sd_compile_then_first_call_does_not_compile(sd_pipe):
    shape = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0)
    out = _first_call_after_compile(
        sd_pipe,
        dict(batch_size=2, **shape),
        dict(prompt=[sd_tiny.PROMPT, "a red bicycle"], key=jax.random.PRNGKey(3), output_type="np", **shape),
    )
    assert out.images.shape == (2, SIZE, SIZE, 3) and np.isfinite(out.images).all()
    again = sd_pipe(prompt=["x", "y"], key=jax.random.key(1), output_type="np", **{**shape, "guidance_scale": 9.0})
    assert sd_pipe.last_compile_seconds == 0.0 and not np.allclose(again.images, out.images)


def test_sd_compile_on_a_mesh(sd_pipe):
    shape = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    single = sd_pipe(prompt=[sd_tiny.PROMPT] * 3, key=jax.random.key(5), output_type="np", **shape).images
    out = _first_call_after_compile(
        sd_pipe,
        dict(batch_size=3, mesh=mesh, **shape),
        dict(prompt=[sd_tiny.PROMPT] * 3, key=jax.random.key(5), output_type="np", mesh=mesh, **shape),
    )
    np.testing.assert_allclose(out.images, single, atol=1e-5)


def test_unconditional_compile_with_pmap(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny.save_diffusers_pipeline(tmp_path / "ddpm"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, parallel="pmap")
    out = _first_call_after_compile(pipe, dict(batch_size=3, **call), dict(batch_size=3, key=jax.random.key(2), **call))
    assert len(out.images) == 3


def test_compile_checks_batch_size(sd_pipe):
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            sd_pipe.compile(batch_size=bad)
