"""Loop-driver extensions for pipelines: per-image generators, starting mid-schedule, per-image jax keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.flax.sampling import ScanProgress, as_key, per_example_keys, per_example_normal
from diffusion_core.flax.sampling import denoise_loop as flax_loop
from diffusion_core.torch.sampling import denoise_loop as torch_loop
from diffusion_core.torch.sampling import randn_tensor
from tests.schedulers import parity


def test_randn_tensor_matches_diffusers_for_one_generator_and_lists():
    from diffusers.utils.torch_utils import randn_tensor as ref_randn

    shape = (3, 2, 4, 4)
    one = randn_tensor(shape, torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, ref_randn(shape, generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    torch.testing.assert_close(randn_tensor(shape, gens()), ref_randn(shape, generator=gens()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator"):
        randn_tensor(shape, gens()[:2])
    with pytest.raises(ValueError, match="generator"):
        randn_tensor(shape, 0)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_loops_started_mid_schedule_agree_and_finish_the_full_run(name):
    import array_api_compat.torch as txp

    sched = schedulers.from_config({"_class_name": name})
    x = parity.make_sample()
    n_steps, first = 6, 2
    st_t = sched.set_timesteps(n_steps, like=torch.from_numpy(x))
    st_j = sched.set_timesteps(n_steps, like=jnp.asarray(x))
    noises = np.stack([parity.make_noise(i) for i in range(len(st_t.timesteps))])
    model_t = lambda a, t: parity.dummy_model(txp, a, t)  # noqa: E731
    noise_t = lambda i: torch.from_numpy(noises[i])  # noqa: E731
    seen = {}
    full, _ = torch_loop(
        sched, model_t, torch.from_numpy(x), st_t, noise_fn=noise_t, callback=lambda i, s, _: seen.update({i: s})
    )
    # Restarting from the sample after call first-1 at begin_index=first finishes the same run
    # (one-step solvers; torch and jax loops started mid-schedule agree for all).
    calls = []
    partial, _ = torch_loop(
        sched,
        model_t,
        seen[first - 1],
        sched.set_timesteps(n_steps, like=torch.from_numpy(x), begin_index=first),
        noise_fn=noise_t,
        callback=lambda i, s, _: calls.append(i),
    )
    assert calls == list(range(first, len(st_t.timesteps)))
    if name != "DPMSolverMultistepScheduler":  # multistep history restarts empty (as diffusers' set_begin_index)
        torch.testing.assert_close(partial, full, rtol=0, atol=0)
    noises_j = jnp.asarray(noises)
    out_j, final = jax.jit(
        lambda a, st: flax_loop(
            sched, lambda b, t: parity.dummy_model(jnp, b, t), a, st, noise_fn=lambda i: noises_j[i], first=first
        )
    )(jnp.asarray(seen[first - 1].numpy()), sched.set_timesteps(n_steps, like=jnp.asarray(x), begin_index=first))
    np.testing.assert_allclose(np.asarray(out_j), partial.numpy(), rtol=2e-5, atol=2e-5)
    assert int(final.step_index) == len(st_t.timesteps)
    with pytest.raises(ValueError, match="first"):
        flax_loop(sched, lambda b, t: b, jnp.asarray(x), st_j, first=len(st_t.timesteps))


def test_per_example_keys_make_images_independent_of_the_batch():
    key = jax.random.key(3)
    eight = per_example_normal(per_example_keys(key, 8), (2, 3))
    two = per_example_normal(per_example_keys(key, 2, offset=6), (2, 3))
    np.testing.assert_array_equal(np.asarray(eight[6:]), np.asarray(two))
    with pytest.raises(ValueError, match="key"):
        per_example_keys(3, 2)


def test_typed_and_raw_keys_are_one_key():
    """jax.random.key(s) and jax.random.PRNGKey(s) (raw uint32[2], jax or numpy) draw the same noise everywhere."""
    typed = per_example_keys(jax.random.key(7), 4)
    for raw in (jax.random.PRNGKey(7), np.asarray(jax.random.PRNGKey(7))):
        np.testing.assert_array_equal(jax.random.key_data(per_example_keys(raw, 4)), jax.random.key_data(typed))
    np.testing.assert_array_equal(jax.random.key_data(as_key(jax.random.key_data(typed), batched=True)),
                                  jax.random.key_data(typed))  # fmt: skip
    sched = schedulers.DDPMScheduler()
    x = jnp.ones((2, 1, 2, 2))
    state = sched.set_timesteps(2, like=x)
    runs = [
        flax_loop(sched, lambda a, t: a * 0.1, x, state, key=k)[0] for k in (jax.random.key(1), jax.random.PRNGKey(1))
    ]
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(runs[1]))
    bad = [jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.int32), jnp.zeros((1, 2), jnp.uint32), typed, "seed", 7]
    for value in bad:
        with pytest.raises(ValueError, match="key must be one PRNG key"):
            as_key(value)
    with pytest.raises(ValueError, match="keys must be a \\(B,\\) vector"):
        flax_loop(sched, lambda a, t: a, x, state, keys=jax.random.key(0))


def test_scan_progress_counts_each_call_once(capsys):
    progress = ScanProgress()
    progress.start(total=5, initial=2)
    for i in (2, 2, 3, 4, 4):  # repeated ticks (one per pmap device) advance once
        progress.tick(i)
    assert progress.bar.n == 5
    progress.close()
    assert "5/5" in capsys.readouterr().err


@pytest.mark.slow  # ~35 s here: compiling for 8 fake devices twice (pmap, mesh)
def test_run_program_gives_the_same_batch_on_one_device_pmap_and_a_mesh():
    from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline, scale_out_mode

    sched = schedulers.DDPMScheduler()  # draws step noise: per-image keys must follow the images

    def program(params, state, x, keys):
        model = lambda a, t: parity.dummy_model(jnp, a, t) * params[0] * params[1]  # noqa: E731
        return flax_loop(sched, model, x, state, keys=keys)[0]

    keys = per_example_keys(jax.random.PRNGKey(0), 8)  # a raw key: per-image keys come out typed
    assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    x = per_example_normal(keys, (2, 4, 4))
    make_state = lambda like: sched.set_timesteps(3, like=like)  # noqa: E731
    mesh = jax.make_mesh((8,), ("data",))
    pipe, weight, scale = DiffusionPipeline(), jnp.float32(0.5), jnp.float32(2.0)
    single = pipe.run_program(jax.jit(program), "single", None, weight, scale, make_state, x, keys)
    pmap = jax.pmap(program, in_axes=((0, None), None, 0, 0))
    for batch in (8, 5):  # 5 on 8 devices: padded, trimmed
        pmapped = pipe.run_program(pmap, "pmap", None, weight, scale, make_state, x[:batch], keys[:batch])
        sharded = pipe.run_program(jax.jit(program), "mesh", mesh, weight, scale, make_state, x[:batch], keys[:batch])
        np.testing.assert_allclose(np.asarray(pmapped), np.asarray(single[:batch]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single[:batch]), atol=1e-6)
    assert scale_out_mode("pmap", None) == "pmap" and scale_out_mode(None, mesh) == "mesh"
    with pytest.raises(ValueError, match="mesh"):
        scale_out_mode(None, "mesh")


def test_both_loops_pass_the_call_index_and_run_the_post_step_hook():
    """``index_model_fn`` and ``post_step`` mean the same in torch's Python loop and flax's scan."""
    import array_api_compat.torch as txp

    sched = schedulers.from_config({"_class_name": "DDIMScheduler"})
    x = parity.make_sample()
    weights = np.linspace(0.5, 1.5, 4).astype(np.float32)  # a per-call weight, indexed by i
    seen = []

    def run(xp, wrap, loop, **extra):
        w = wrap(weights)

        def model_fn(sample, t, i):
            return parity.dummy_model(xp, sample, t) * w[i]

        def post_step(sample, state):
            seen.append(type(sample).__module__)
            return sample * 0.9  # any rewrite after each step

        state = sched.set_timesteps(4, like=wrap(x))
        out, _ = loop(sched, model_fn, wrap(x), state, index_model_fn=True, post_step=post_step, **extra)
        return np.asarray(out)

    a = run(txp, torch.from_numpy, torch_loop)
    b = run(jnp, jnp.asarray, flax_loop)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert seen.count("torch") == 4  # the Python loop calls the hook after each of the 4 steps
    plain = run(txp, torch.from_numpy, lambda *args, post_step, **kw: torch_loop(*args, **kw))
    assert np.abs(plain - a).max() > 1e-2  # the hook changed the result
