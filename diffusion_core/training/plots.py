"""The loss-curve PNG a training run leaves beside ``loss.csv`` (matplotlib: the optional ``viz`` extra)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

LOSS_CURVE = "loss_curve.png"


def write_loss_curve(output_dir: str | Path, log: bool = True) -> Path | None:
    """Plot ``loss.csv`` (loss and a 50-step running mean against the step) to ``loss_curve.png``.

    Without matplotlib the plot is skipped with a one-line note (when ``log``); returns the path or None.
    """
    root = Path(output_dir)
    if importlib.util.find_spec("matplotlib") is None:
        if log:
            print("loss curve skipped: matplotlib is not installed (pip install 'diffusion_core[viz]')")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with (root / "loss.csv").open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0] != "step"]
    if not rows:
        return None
    steps = np.array([int(r[0]) for r in rows])
    loss = np.array([float(r[1]) for r in rows])
    window = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")  # (N - window + 1,)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = root / LOSS_CURVE
    fig.savefig(path)
    plt.close(fig)
    return path
