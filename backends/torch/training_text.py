"""PyTorch text-to-image fine-tuning and LoRA training of a Stable Diffusion pipeline's UNet.

``encode_dataset(pipe, captioned)`` runs the frozen VAE and CLIP text encoder once over the data;
``TextToImageTrainer(pipe, config, lora=None).fit(dataset, ...)`` trains the UNet with the shared loop.
With ``lora`` the UNet is frozen and only the factors of the inference LoRA layers (``diffusion_core.torch.lora``,
made trainable) are optimised; the output is ``pytorch_lora_weights.safetensors`` in diffusers' PEFT format.
Without it the whole UNet trains and the output folder is the pipeline with the new UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_core.torch.lora import install, lora_deltas, lora_targets
from diffusion_core.torch.training import Trainer
from diffusion_core.training import captions
from diffusion_core.training import lora as lora_train
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import ImageDataset
from diffusion_core.weights.lora import LORA_WEIGHTS_NAME, load_lora, save_lora

EMA_LORA_NAME = "pytorch_lora_weights_ema.safetensors"  # a LoRA checkpoint's EMA factors


def encode_dataset(pipe: Any, data: captions.CaptionedImages, batch_size: int = 8) -> ImageDataset:
    """Latents and text context of every example, encoded once by ``pipe``'s frozen VAE and text encoder."""

    def encode_images(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(pipe.device, pipe.vae.dtype)
        with torch.inference_mode():
            return pipe.vae.encode(x).mode().float().cpu().numpy()  # (b, C, h, w)

    def encode_ids(ids: np.ndarray) -> np.ndarray:
        return pipe._encode_ids(ids, None).float().cpu().numpy()  # (b, L, D)

    return captions.encode_captioned(data, encode_images, encode_ids, pipe.tokenizer, pipe.vae.config, batch_size)


class TextToImageTrainer(Trainer):
    """Fine-tunes ``pipe.unet`` (or LoRA adapters on it) on an :func:`encode_dataset` dataset."""

    def __init__(
        self,
        pipe: Any,
        config: TrainConfig | None = None,
        lora: lora_train.LoraTrainConfig | None = None,
        noise_scheduler: Any = None,
    ) -> None:
        config = config if config is not None else TrainConfig()
        captions.check_sd_pipeline(pipe)
        self.pipe, self.lora = pipe, lora
        for frozen in (pipe.vae, pipe.text_encoder):
            frozen.requires_grad_(False)
        if lora is not None:
            pipe.unet.requires_grad_(False)
            self.lora_layers = lora_train.init_layers(lora_targets(pipe.unet), lora, config.seed)
            install(pipe.unet, lora_train.packs(self.lora_layers), pipe._lora_hooks("unet"))
            for delta in lora_deltas(pipe.unet).values():
                delta.make_trainable()
        sched = noise_scheduler if noise_scheduler is not None else captions.training_scheduler(pipe.scheduler)
        super().__init__(pipe.unet, sched, config)

    # --- LoRA factors ---------------------------------------------------------------------------------

    def trained_layers(self, ema: bool = False) -> dict[str, Any]:
        """The adapters as trained (or their EMA): ``{layer path: LoraLayer}`` in PyTorch layout."""
        values = dict(zip(self.trainable, self.ema, strict=True)) if ema and self.ema is not None else self.trainable
        factors = {
            path: tuple(values[f"{path}.lora.{name}"].detach().float().cpu().numpy() for name in ("down", "up"))
            for path in lora_deltas(self.unet)
        }
        return lora_train.with_factors(self.lora_layers, factors)

    def _read_factors(self, folder: Path, weight_name: str) -> dict[str, torch.Tensor]:
        layers = load_lora(folder, {"unet": lora_targets(self.unet)}, weight_name)["unet"]
        lora_train.check_resumed(layers, self.lora_layers, folder / weight_name)
        return {f"{p}.lora.{n}": torch.from_numpy(getattr(x, n)) for p, x in layers.items() for n in ("down", "up")}

    # --- checkpoint and export ------------------------------------------------------------------------

    def write_weights(self, folder: Path) -> None:
        if self.lora is None:
            return super().write_weights(folder)
        save_lora(folder, {"unet": self.trained_layers()})
        if self.ema is not None:
            save_lora(folder, {"unet": self.trained_layers(ema=True)}, EMA_LORA_NAME)

    def read_weights(self, folder: Path) -> None:
        if self.lora is None:
            return super().read_weights(folder)
        with torch.no_grad():
            for name, value in self._read_factors(folder, LORA_WEIGHTS_NAME).items():
                self.trainable[name].copy_(value)
        if self.ema is not None:
            ema = self._read_factors(folder, EMA_LORA_NAME)
            self.ema = [ema[n].to(self.device) for n in self.trainable]

    def export_pipeline(self, folder: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (the EMA factors when EMA is on); else the pipeline folder."""
        if self.lora is not None:
            save_lora(folder, {"unet": self.trained_layers(ema=True)})
            return
        type(self.pipe)(**{**self.pipe.components, "unet": self.ema_model()}).save_pretrained(folder)
