"""How one batch splits over the processes of a data-parallel run: contiguous shares, in process order.

Process ``index`` of ``count`` takes items ``[start, stop)``; the first ``n % count`` processes take one item more,
so any ``n`` splits (a process may get none). Joining the shares in process order gives the batch back, which is
what makes a torchrun run's images and gradients those of one process. Framework-free: the torch backend's
generation and training both split with it.
"""

from __future__ import annotations


def process_share(n: int, index: int, count: int) -> slice:
    """Process ``index``'s items of a batch of ``n`` split over ``count`` processes: ``slice(start, stop)``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"index must be an int in [0, {count}), got {index!r}")
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))
