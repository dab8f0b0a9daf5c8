"""Default model configs for the ``train`` command and where the shipped default model lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The shipped digits model: a small class-conditional UNet2DModel for 16x16 one-channel images.
DIGITS_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "num_class_embeds": 10,
}

# The noise schedule it trains with (diffusers' DDPMScheduler defaults, 1000 steps, epsilon target).
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def default_model_path() -> Path:
    """The package-data folder of the shipped digits pipeline (``model_index.json``, ``unet/``, ``scheduler/``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "digits"


def unet_config_for(channels: int, size: int, num_classes: int) -> dict[str, Any]:
    """The digits config resized for a data set: its channels, square ``size`` and class count (0: unconditional)."""
    cfg = {**DIGITS_UNET_CONFIG, "sample_size": size, "in_channels": channels, "out_channels": channels}
    cfg["num_class_embeds"] = num_classes or None
    return cfg
