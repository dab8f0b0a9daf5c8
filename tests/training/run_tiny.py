"""Subprocess entry for the kill/resume tests: ``python -m tests.training.run_tiny BACKEND OUT STEPS [--resume]``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.training.harness import make_trainer  # noqa: E402
from tests.training.tiny import dataset  # noqa: E402

if __name__ == "__main__":
    backend, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    make_trainer(backend).fit(dataset(), steps, out, checkpoint_every=2, resume="--resume" in sys.argv, progress=False)
