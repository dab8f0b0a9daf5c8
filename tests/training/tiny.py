"""Tiny UNet2DModel configs and matched torch / flax models for the training tests."""

from __future__ import annotations

import numpy as np

from diffusion_core import schedulers, training

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "num_class_embeds": 3,
}


def scheduler(prediction_type: str = "epsilon"):
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100, "prediction_type": prediction_type}
    return schedulers.from_config(cfg)


def dataset(n: int = 24, seed: int = 0) -> training.ImageDataset:
    """Three classes of 8x8 blobs (a bright square whose position is the class), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 1, 8, 8), -1.0, np.float32)
    labels = np.arange(n, dtype=np.int64) % 3
    for i, c in enumerate(labels):
        images[i, 0, 1 + 2 * c : 4 + 2 * c, 2:6] = 1.0
    images += 0.05 * rng.standard_normal(images.shape).astype(np.float32)
    return training.ImageDataset(images, labels, ("a", "b", "c"))


def torch_unet(seed: int = 0):
    import torch

    from diffusion_core.torch import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET)


def flax_unet_like(torch_model):
    """A Flax UNet2DModel holding ``torch_model``'s weights."""
    from flax import nnx

    from diffusion_core.flax import UNet2DModel
    from diffusion_core.flax.models.loading import load_torch_state_dict

    model = UNet2DModel(**TINY_UNET, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    return model
