"""Flax text-to-image fine-tuning and LoRA training of a Stable Diffusion pipeline's UNet (optax).

``encode_dataset(pipe, captioned)`` runs the frozen VAE and CLIP text encoder once over the data;
``TextToImageTrainer(pipe, config, lora=None).fit(dataset, ...)`` trains the UNet with the shared loop.
With ``lora`` only the ``lora_down`` / ``lora_up`` variables of the inference LoRA layers
(``diffusion_core.flax.lora``) are optimised; the base weights are frozen state. The output is
``pytorch_lora_weights.safetensors`` in diffusers' PEFT format. Without it the whole UNet trains and the output
folder is the pipeline with the new UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_core.flax.lora import install, is_lora_factor, lora_factors
from diffusion_core.flax.pipelines.sd_program import vae_encode_mode
from diffusion_core.flax.training import Trainer
from diffusion_core.training import captions
from diffusion_core.training import lora as lora_train
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import ImageDataset
from diffusion_core.weights.lora import LORA_WEIGHTS_NAME, load_lora, save_lora

EMA_LORA_NAME = "pytorch_lora_weights_ema.safetensors"  # a LoRA checkpoint's EMA factors


def encode_dataset(pipe: Any, data: captions.CaptionedImages, batch_size: int = 8) -> ImageDataset:
    """Latents and text context of every example, encoded once by ``pipe``'s frozen VAE and text encoder."""

    def encode_images(images: np.ndarray) -> np.ndarray:
        return np.asarray(vae_encode_mode(pipe.vae, jnp.asarray(images)))  # (b, C, h, w)

    def encode_ids(ids: np.ndarray) -> np.ndarray:
        return np.asarray(pipe._encode_ids(ids, None))  # (b, L, D)

    return captions.encode_captioned(data, encode_images, encode_ids, pipe.tokenizer, pipe.vae.config, batch_size)


class TextToImageTrainer(Trainer):
    """Fine-tunes ``pipe.unet`` (or LoRA adapters on it) on an :func:`encode_dataset` dataset."""

    def __init__(
        self,
        pipe: Any,
        config: TrainConfig | None = None,
        lora: lora_train.LoraTrainConfig | None = None,
        noise_scheduler: Any = None,
        mesh: Mesh | None = None,
    ) -> None:
        config = config if config is not None else TrainConfig()
        captions.check_sd_pipeline(pipe)
        self.pipe, self.lora = pipe, lora
        if lora is not None:
            self.lora_layers = lora_train.init_layers(pipe._lora_targets("unet"), lora, config.seed)
            install(pipe.unet, lora_train.packs(self.lora_layers))
            self.trainable = is_lora_factor
        sched = noise_scheduler if noise_scheduler is not None else captions.training_scheduler(pipe.scheduler)
        super().__init__(pipe.unet, sched, config, mesh)

    def trained_layers(self, ema: bool = False) -> dict[str, Any]:
        """The adapters as trained (or their EMA): ``{layer path: LoraLayer}`` in PyTorch layout."""
        return lora_train.with_factors(self.lora_layers, lora_factors(self.model(ema=ema)))

    def _read_factors(self, folder: Path, weight_name: str) -> nnx.State:
        layers = load_lora(folder, {"unet": self.pipe._lora_targets("unet")}, weight_name)["unet"]
        lora_train.check_resumed(layers, self.lora_layers, folder / weight_name)
        model = nnx.clone(self.model())
        install(model, lora_train.packs(layers))
        return nnx.split(model, self.trainable, ...)[1]

    def write_weights(self, folder: Path) -> None:
        if self.lora is None:
            return super().write_weights(folder)
        save_lora(folder, {"unet": self.trained_layers()})
        if self.ema is not None:
            save_lora(folder, {"unet": self.trained_layers(ema=True)}, EMA_LORA_NAME)

    def read_weights(self, folder: Path) -> None:
        if self.lora is None:
            return super().read_weights(folder)
        self.params = self._read_factors(folder, LORA_WEIGHTS_NAME)
        if self.ema is not None:
            self.ema = self._read_factors(folder, EMA_LORA_NAME)

    def export_pipeline(self, folder: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (the EMA factors when EMA is on); else the pipeline folder."""
        if self.lora is not None:
            save_lora(folder, {"unet": self.trained_layers(ema=True)})
            return
        type(self.pipe)(**{**self.pipe.components, "unet": self.model(ema=True)}).save_pretrained(folder)
