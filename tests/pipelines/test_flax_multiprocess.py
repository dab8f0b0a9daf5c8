"""Two JAX processes over loopback (``jax.distributed``, gloo on CPU) give the images of one process.

Each child has 2 forced CPU devices; the mesh spans the 4 global devices; both make the same call (5 images: padded
to 8, trimmed) and get the whole batch back. ``initialize_distributed`` reads the documented environment variables.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.flax.distributed import initialize_distributed
from diffusion_core.flax.pipelines import DiffusionPipeline
from tests.pipelines import tiny

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 5

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from diffusion_core.flax import initialize_distributed

    assert initialize_distributed()
    import jax
    from diffusion_core import schedulers
    from diffusion_core.flax.pipelines import DiffusionPipeline

    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    pipe.scheduler = schedulers.DDPMScheduler()
    pipe.set_progress_bar_config(disable=True)
    batch, steps = int(sys.argv[3]), int(sys.argv[4])
    try:
        pipe(batch_size=batch, key=jax.random.PRNGKey(3), parallel="pmap")
        raise AssertionError("pmap across processes must be refused")
    except ValueError as error:
        assert "mesh=" in str(error)
    out = pipe(batch_size=batch, key=jax.random.PRNGKey(3), num_inference_steps=steps, output_type="np",
               mesh=jax.make_mesh((4,), ("data",)))
    np.save(sys.argv[2], out.images)  # each process: the whole batch
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes compiling the same program on a 2-core machine: ~40 s
def test_two_processes_give_the_images_of_one(tmp_path):
    folder = tiny.save_diffusers_pipeline(tmp_path / "ddpm", unet=tiny.MINI_UNET)
    address = f"127.0.0.1:{_free_port()}"
    children = []
    for index in range(2):
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index),
        }  # fmt: skip
        args = [sys.executable, "-c", CHILD, str(folder), str(tmp_path / f"images{index}.npy"), str(BATCH), str(STEPS)]
        children.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    for child in children:
        _, err = child.communicate(timeout=400)
        assert child.returncode == 0, err[-3000:]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = schedulers.DDPMScheduler()
    pipe.set_progress_bar_config(disable=True)
    single = pipe(batch_size=BATCH, key=jax.random.key(3), num_inference_steps=STEPS, output_type="np").images
    for index in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"images{index}.npy"), single, atol=1e-5)


def test_environment_is_checked(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID: set both or neither"):
        initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID must be in \[0, JAX_NUM_PROCESSES=2\)"):
        initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be a non-negative integer"):
        initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        initialize_distributed()
