"""The backends' loop drivers: torch Python loop and jax lax.scan give the same samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.flax import denoise_loop as flax_loop
from diffusion_core.flax import jit_denoise_loop
from diffusion_core.torch import denoise_loop as torch_loop
from tests.schedulers import parity

STEPS = 5


def _start(sched, backend):
    x = parity.to_backend(backend, parity.make_sample())
    state = sched.set_timesteps(STEPS, like=x)
    return x * state.init_noise_sigma, state


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_torch_and_flax_drivers_agree_given_the_same_noise(name):
    sched = schedulers.from_config({"_class_name": name})
    x_t, st_t = _start(sched, "torch")
    x_j, st_j = _start(sched, "jax")
    n_calls = int(st_t.timesteps.shape[0])
    noises = np.stack([parity.make_noise(i) for i in range(n_calls)])
    out_t, _ = torch_loop(
        sched,
        lambda x, t: parity.dummy_model(torch_xp(), x, t),
        x_t,
        st_t,
        noise_fn=lambda i: torch.from_numpy(noises[i]),
    )
    noises_j = jnp.asarray(noises)
    out_j, final = jax.jit(
        lambda x, st: flax_loop(
            sched, lambda a, t: parity.dummy_model(jnp, a, t), x, st, noise_fn=lambda i: noises_j[i]
        )
    )(x_j, st_j)
    np.testing.assert_allclose(np.asarray(out_j), out_t.numpy(), rtol=2e-5, atol=2e-5)
    assert int(final.step_index) == n_calls


def test_torch_generator_noise_is_reproducible_and_seed_dependent():
    sched = schedulers.EulerAncestralDiscreteScheduler()
    model = lambda x, t: parity.dummy_model(torch_xp(), x, t)  # noqa: E731
    runs = []
    for seed in (0, 0, 1):
        x, st = _start(sched, "torch")
        runs.append(torch_loop(sched, model, x, st, generator=torch.Generator().manual_seed(seed))[0])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])


def test_flax_key_noise_is_reproducible_and_needs_a_key():
    sched = schedulers.EulerAncestralDiscreteScheduler()
    run = jit_denoise_loop(sched, lambda x, t: parity.dummy_model(jnp, x, t))
    x, st = _start(sched, "jax")
    a, _ = run(x, st, jax.random.key(0))
    b, _ = run(x, st, jax.random.key(0))
    c, _ = run(x, st, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="key"):
        flax_loop(sched, lambda x, t: x, x, st)


def test_flax_loop_hands_the_call_index_to_the_model_and_runs_post_step():
    sched = schedulers.EulerAncestralDiscreteScheduler()
    x, st = _start(sched, "jax")
    key = jax.random.key(3)

    def model(a, t, i):
        return parity.dummy_model(jnp, a, t) * (1.0 + 0.1 * i)

    def post(a, state):  # depends on the advanced state, as the inpaint blend does
        return a * 0.9 + 0.01 * state.step_index

    run = jax.jit(lambda a, s: flax_loop(sched, model, a, s, key=key, index_model_fn=True, post_step=post))
    out, final = run(x, st)
    ref, state = x, st
    for i in range(int(st.timesteps.shape[0])):  # the same steps, eagerly, one by one
        model_out = model(sched.scale_model_input(state, ref), sched.current_timestep(state), i)
        noise = jax.random.normal(jax.random.fold_in(key, i), ref.shape, ref.dtype)
        ref, state = sched.step(state, model_out, ref, noise=noise)
        ref = post(ref, state)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert int(final.step_index) == int(state.step_index)
    plain, _ = jax.jit(lambda a, s: flax_loop(sched, lambda b, t: model(b, t, 0), a, s, key=key))(x, st)
    assert not np.allclose(np.asarray(plain), np.asarray(out), atol=1e-3)


def torch_xp():
    import array_api_compat.torch as xp

    return xp
