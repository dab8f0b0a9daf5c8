"""Training, defined once: targets, min-SNR weighting, EMA and LR rules, data order, checkpoints, the loop.

Framework-neutral (numpy + array API); ``diffusion_core.flax.training`` and ``diffusion_core.torch.training``
bind an optimiser step to it.
"""

from diffusion_core.training.captions import CaptionedImages, captioned_images, load_captioned_folder
from diffusion_core.training.checkpoint import checkpoint_steps, latest_checkpoint
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import ImageDataset, StepBatch, load_digits, load_image_folder, step_batch
from diffusion_core.training.loop import fit
from diffusion_core.training.lora import LoraTrainConfig
from diffusion_core.training.objectives import (
    PREDICTION_TYPES,
    diffusion_loss,
    min_snr_weights,
    scheduler_prediction_type,
    snr,
    training_target,
)
from diffusion_core.training.schedules import EMAConfig, ema_decay, learning_rate

__all__ = [
    "CaptionedImages",
    "LoraTrainConfig",
    "captioned_images",
    "load_captioned_folder",
    "PREDICTION_TYPES",
    "EMAConfig",
    "ImageDataset",
    "StepBatch",
    "TrainConfig",
    "checkpoint_steps",
    "diffusion_loss",
    "ema_decay",
    "fit",
    "latest_checkpoint",
    "learning_rate",
    "load_digits",
    "load_image_folder",
    "min_snr_weights",
    "scheduler_prediction_type",
    "snr",
    "step_batch",
    "training_target",
]
