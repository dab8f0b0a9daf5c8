"""Multi-process JAX from the usual environment variables: ``initialize_distributed()`` before the first JAX call.

Each process runs the same pipeline call with a mesh over ``jax.devices()`` (every process's devices); each feeds its
own devices and gets the whole batch back (see ``diffusion_core.flax.pipelines.pipeline_utils``). On CPU the processes
talk over gloo (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os

import jax

# Our environment variables (JAX reads JAX_COORDINATOR_ADDRESS itself; the counts it takes only from cluster managers).
ENV_ADDRESS, ENV_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def initialize_distributed() -> bool:
    """Start ``jax.distributed`` from ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; without them, from a cluster manager JAX detects (SLURM, Open MPI, ...).

    Returns False (and does nothing) when none is set and no cluster is detected: a single process.
    """
    address, count, index = os.environ.get(ENV_ADDRESS), _env_int(ENV_PROCESSES), _env_int(ENV_PROCESS_ID)
    if (count is None) != (index is None):
        raise ValueError(f"{ENV_PROCESSES} and {ENV_PROCESS_ID}: set both or neither")
    if count is not None and not 0 <= index < count:
        raise ValueError(f"{ENV_PROCESS_ID} must be in [0, {ENV_PROCESSES}={count}), got {index}")
    if count is not None and not address:
        raise ValueError(f"{ENV_ADDRESS} (host:port of process 0) is needed with {ENV_PROCESSES}")
    if address is None and count is None:
        try:
            jax.distributed.initialize()
        except ValueError:  # no cluster manager detected: one process
            return False
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes (GPUs: NCCL)
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    return True
