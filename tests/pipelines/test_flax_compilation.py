"""The Flax backend's compilation bookkeeping: compile time of a block, and the opt-in persistent cache
(a second process loads the compiled denoising loop from the folder instead of compiling it)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from diffusion_core.flax import enable_compilation_cache
from diffusion_core.flax.compilation import compile_timer

# A child process: the persistent cache on `folder`, one jitted DDPM loop (draws step noise from a raw key), then
# the number of persistent-cache hits and the compile seconds as JSON on stdout.
CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from diffusion_core import schedulers
    from diffusion_core.flax import enable_compilation_cache, jit_denoise_loop
    from diffusion_core.flax.compilation import compile_timer

    hits = []
    jax.monitoring.register_event_listener(lambda event, **_: hits.append(event == "/jax/compilation_cache/cache_hits"))
    enable_compilation_cache(sys.argv[1], min_compile_time_secs=0)
    sched = schedulers.DDPMScheduler()
    x = jnp.ones((1, 2, 4, 4))
    run = jit_denoise_loop(sched, lambda a, t: jnp.tanh(a) * 0.5)
    with compile_timer() as timer:
        out = run(x, sched.set_timesteps(3, like=x), jax.random.PRNGKey(0))[0]
    print(json.dumps({"hits": sum(hits), "compile_seconds": timer.seconds, "sum": float(out.sum())}))
    """
)


def _child(folder):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_hits_the_persistent_cache(tmp_path):
    folder = tmp_path / "jax-cache"
    first, second = _child(folder), _child(folder)
    assert first["hits"] == 0 and any(folder.iterdir())  # compiled and written
    assert second["hits"] >= 1  # loaded from the folder
    assert second["sum"] == first["sum"]


def test_compile_timer_counts_compiles_only():
    f = jax.jit(lambda a: jnp.sin(a) * 3.0 + 1.0)
    a, b = jnp.ones(7), jnp.zeros(7)
    with compile_timer() as timer:
        f(a).block_until_ready()
    with compile_timer() as cached:
        f(b).block_until_ready()
    assert timer.seconds > 0.0 and cached.seconds == 0.0


@pytest.mark.parametrize(
    "args, match", [((None,), "cache_dir"), (("",), "cache_dir"), (("/tmp/x", -1.0), "min_compile_time_secs")]
)
def test_bad_cache_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        enable_compilation_cache(*args)
