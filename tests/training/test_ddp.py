"""DDP training under ``torchrun --nproc_per_node 2`` (gloo, CPU) gives the weights of one process.

Two processes train the tiny UNet on the same global batches (uneven shares, and gradient accumulation), are
stopped after 2 steps and resumed to 4; the final weights, EMA weights and loss log equal an uninterrupted
one-process run's. Only rank 0 writes checkpoints and the pipeline folder.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.pipelines.test_torchrun import ROOT, torchrun
from tests.training import tiny, torchrun_train
from tests.training.harness import make_trainer

WEIGHTS = "diffusion_pytorch_model.safetensors"
FILES = (f"unet/{WEIGHTS}", f"checkpoints/checkpoint-4/unet_ema/{WEIGHTS}")  # trained weights, EMA weights


def _losses(folder) -> np.ndarray:
    with (folder / "loss.csv").open(newline="") as f:
        return np.array([[float(v) for v in row] for row in list(csv.reader(f))[1:]])


def test_two_processes_train_the_weights_of_one(tmp_path):
    torchrun(2, ROOT / "tests/training/torchrun_train.py", str(tmp_path / "ddp"))
    assert json.loads((tmp_path / "ddp/writes-rank1.json").read_text()) == []
    rank0 = json.loads((tmp_path / "ddp/writes-rank0.json").read_text())
    assert rank0.count("pipeline") == 2 * len(torchrun_train.CONFIGS)
    for name, config in torchrun_train.CONFIGS.items():
        single = tmp_path / "one" / name
        make_trainer("torch", config).fit(tiny.dataset(), torchrun_train.STEPS, single, progress=False)
        ddp = tmp_path / "ddp" / name
        for file in FILES:
            want, got = load_file(single / file), load_file(ddp / file)
            assert set(got) == set(want)
            for key, value in want.items():  # to 1e-5 of each tensor's scale
                error = np.abs(got[key] - value).max() / np.abs(value).max()
                assert error < 1e-5, f"{name}: {file} {key} differs by {error:.2g} of its scale"
        np.testing.assert_allclose(_losses(ddp), _losses(single), rtol=1e-4)
        assert len(_losses(ddp)) == torchrun_train.STEPS


def test_batch_too_small_for_the_processes_is_refused(monkeypatch):
    from diffusion_core import training
    from diffusion_core.torch import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    config = training.TrainConfig(batch_size=6, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be at least gradient_accumulation_steps \(2\) x "):
        make_trainer("torch", config)
