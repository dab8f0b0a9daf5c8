"""The torchrun side of the DDP training test: train the tiny UNet under ``torchrun``, interrupted and resumed.

``torchrun ... torchrun_train.py OUT``: for each config in :data:`CONFIGS` every process trains
``OUT/<name>`` for ``STOP`` steps (a checkpoint every step), then a fresh trainer resumes it to ``STEPS``. Each
process records which file writes it made in ``OUT/writes-rank<r>.json`` (only rank 0 may make any).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffusion_core import training
from diffusion_core.training import loop
from tests.training.harness import make_trainer

STEPS, STOP = 4, 2
# 5 examples split 3 + 2 over two processes; 6 with accumulation: 3 + 3, micro-batches 2 + 1. adam_epsilon 1e-3:
# Adam divides by sqrt(v), so gradients that are zero up to round-off (an attention key's bias) would otherwise move
# by a full step of noise in either direction, whatever order the processes sum in.
COMMON = dict(learning_rate=3e-3, adam_epsilon=1e-3)
CONFIGS = {
    "uneven": training.TrainConfig(batch_size=5, lr_schedule="cosine", lr_warmup_steps=1, seed=1, **COMMON),
    "accumulate": training.TrainConfig(batch_size=6, gradient_accumulation_steps=2, seed=2, **COMMON),
}


def main(out: str) -> None:
    from diffusion_core.torch import distributed
    from tests.training import tiny

    assert distributed.initialize()
    writes: list[str] = []
    checkpoint, export = loop.ckpt.write_checkpoint, loop.export_pipeline

    def recorded(name, fn):
        def call(*args, **kwargs):
            writes.append(name)
            return fn(*args, **kwargs)

        return call

    loop.ckpt.write_checkpoint = recorded("checkpoint", checkpoint)
    loop.export_pipeline = recorded("pipeline", export)
    for name, config in CONFIGS.items():
        make_trainer("torch", config).fit(tiny.dataset(), STOP, Path(out) / name, checkpoint_every=1, progress=False)
        make_trainer("torch", config).fit(tiny.dataset(), STEPS, Path(out) / name, resume=True, progress=False)
    (Path(out) / f"writes-rank{distributed.rank()}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main(sys.argv[1])
