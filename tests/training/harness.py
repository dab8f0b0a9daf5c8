"""Build the tiny trainers the training tests share (same seeds in and out of subprocesses)."""

from __future__ import annotations

from diffusion_core import training
from tests.training import tiny

CONFIG = training.TrainConfig(batch_size=6, learning_rate=3e-3, lr_schedule="cosine", lr_warmup_steps=2, seed=1)


def make_trainer(backend: str, config: training.TrainConfig = CONFIG):
    if backend == "torch":
        import torch

        from diffusion_core.torch.training import Trainer

        torch.set_num_threads(1)
        return Trainer(tiny.torch_unet(), tiny.scheduler(), config)
    from diffusion_core.flax.training import Trainer

    return Trainer(tiny.flax_unet_like(tiny.torch_unet()), tiny.scheduler(), config)
