"""torch.distributed for data parallelism: join torchrun's process group, split a batch, gather the results.

``initialize()`` starts the default process group from what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, nccl when CUDA is there. A group the caller
started (``torch.distributed.init_process_group`` or accelerate) is used as it is; without torchrun and without a
group everything here describes one process (rank 0 of 1). The pipelines (``pipe.enable_distributed()``) and the
trainer (``DistributedDataParallel``) split their batches with :func:`local_share` and join them with
:func:`all_gather_rows`, so a run's images and weights are those of one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from diffusion_core.data_parallel import process_share

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl")
T = TypeVar("T")


def initialize(backend: str | None = None) -> bool:
    """Join the process group torchrun describes; True when a group is active afterwards.

    ``backend``: ``"gloo"`` or ``"nccl"``; None picks nccl when CUDA is available, else gloo. With nccl each
    process uses GPU ``LOCAL_RANK``. Returns False (doing nothing) outside torchrun; an active group is kept.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if is_active():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"torchrun's environment is incomplete: {missing} unset (launch with torchrun)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    return True


def is_active() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main_process() -> bool:
    """Rank 0 (or no group): the process that writes files."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` when CUDA is there (the current GPU outside torchrun), else the
    CPU. Generators stay on the CPU regardless (see ``pipe.to``), so every device starts from the same noise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local)) if local is not None else torch.device("cuda", torch.cuda.current_device())


def local_share(n: int) -> slice:
    """This process's contiguous share of a batch of ``n`` (the first ``n % world`` ranks take one more)."""
    return process_share(n, rank(), world_size())


def split_between_processes(items: Sequence[T]) -> Sequence[T]:
    """This process's share of ``items`` (accelerate's ``split_between_processes``, without padding)."""
    return items[local_share(len(items))]


def all_gather_rows(rows: Any) -> Any:
    """Every process's ``rows`` (numpy or a tensor, (n_rank, ...)) joined in rank order, on every process.

    Shares may differ in size (uneven batches). Tensors come back on the device they left; one process returns
    ``rows`` itself.
    """
    if world_size() == 1:
        return rows
    if torch.is_tensor(rows):
        where = rows.device
        return torch.cat([torch.as_tensor(p) for p in _gather_objects(rows.detach().cpu())]).to(where)
    return np.concatenate(_gather_objects(np.asarray(rows)))


def _gather_objects(value: Any) -> list[Any]:
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over the processes (``value`` itself for one)."""
    if world_size() == 1:
        return value
    where = device() if dist.get_backend() == "nccl" else torch.device("cpu")  # nccl reduces GPU tensors only
    total = torch.tensor([value], dtype=torch.float64, device=where)
    dist.all_reduce(total)
    return float(total.item())


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if world_size() > 1:
        dist.barrier()
