"""PyTorch trainer: AdamW, global-norm clipping, gradient accumulation, bf16 autocast, EMA, exact resume.

The losses, rates, decays, data order and checkpoint layout come from ``diffusion_core.training``;
this module binds them to ``torch.optim.AdamW`` and an ``nn.Module`` UNet.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffusion_core import training as core
from diffusion_core.training import checkpoint as ckpt
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import StepBatch
from diffusion_core.training.loop import FitMixin

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class Trainer(FitMixin):
    """``Trainer(unet, noise_scheduler, config).fit(dataset, steps=..., output_dir=...)``; see ``training.fit``."""

    def __init__(self, unet: torch.nn.Module, noise_scheduler: Any, config: TrainConfig | None = None) -> None:
        self.unet, self.noise_scheduler = unet, noise_scheduler
        self.config = config if config is not None else TrainConfig()
        self.prediction_type = self.config.prediction_type or core.scheduler_prediction_type(noise_scheduler)
        cfg = self.config
        # what the optimiser updates: parameters left trainable (a LoRA run freezes the base and trains its factors)
        self.trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            list(self.trainable.values()),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        self.ema = [p.detach().clone() for p in self.trainable.values()] if cfg.ema is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def loss(self, images: Any, noise: Any, timesteps: Any, labels: Any = None, context: Any = None) -> torch.Tensor:
        """The scalar loss of one (micro-)batch (numpy or tensors); differentiable in the UNet's parameters.

        ``context``: the text context (B, L, D) a UNet2DConditionModel takes as ``encoder_hidden_states``."""
        dev = self.device
        x0, eps = torch.as_tensor(images, device=dev), torch.as_tensor(noise, device=dev)
        t = torch.as_tensor(timesteps, device=dev)
        noisy = self.noise_scheduler.add_noise(x0, eps, t)
        y = None if labels is None else torch.as_tensor(labels, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16"):
            text = () if context is None else (torch.as_tensor(context, device=dev),)
            out = self.unet(noisy, t, *text, class_labels=y)
        return core.diffusion_loss(
            self.noise_scheduler, out.float(), x0, eps, t, self.prediction_type, self.config.snr_gamma
        )

    def train_step(self, batch: StepBatch, lr: float, decay: float) -> float:
        """One optimisation step over ``batch`` (split into accumulation micro-batches); returns the mean loss."""
        cfg = self.config
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, m = 0.0, cfg.micro_batch_size
        for i in range(cfg.gradient_accumulation_steps):
            part = slice(i * m, (i + 1) * m)
            labels = None if batch.labels is None else batch.labels[part]
            context = None if batch.conditioning is None else batch.conditioning[part]
            loss = self.loss(batch.images[part], batch.noise[part], batch.timesteps[part], labels, context)
            (loss / cfg.gradient_accumulation_steps).backward()
            total += float(loss.detach()) / cfg.gradient_accumulation_steps
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.trainable.values(), strict=True):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return total

    def ema_model(self) -> torch.nn.Module:
        """A copy of the UNet holding the EMA weights (the UNet itself when EMA is off)."""
        if self.ema is None:
            return self.unet
        model = copy.deepcopy(self.unet)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, e in zip(self.trainable, self.ema, strict=True):
                params[name].copy_(e)
        return model

    def sample_images(
        self, num_images: int, class_labels: np.ndarray | None, num_inference_steps: int, seed: int
    ) -> np.ndarray:
        """(B, H, W, C) images in [0, 1] from the EMA weights with DDIM; image i starts from seed + i."""
        from diffusion_core.torch import DDIMPipeline

        pipe = DDIMPipeline(unet=self.ema_model(), scheduler=self.noise_scheduler)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        out = pipe(
            batch_size=num_images,
            generator=generators,
            num_inference_steps=num_inference_steps,
            output_type="np",
            class_labels=class_labels,
        )
        self.unet.train()
        return out.images

    def write_state(self, folder: Path) -> None:
        self.write_weights(folder)
        self.write_optimizer(folder)

    def read_state(self, folder: Path) -> None:
        self.read_weights(folder)
        self.read_optimizer(folder)

    def write_weights(self, folder: Path) -> None:
        """The trained weights (and their EMA) into a checkpoint folder."""
        self.unet.save_pretrained(folder / ckpt.UNET)
        if self.ema is not None:
            self.ema_model().save_pretrained(folder / ckpt.UNET_EMA)

    def write_optimizer(self, folder: Path) -> None:
        state = self.optimizer.state_dict()
        arrays = {f"{i}.{k}": v.detach().cpu().numpy() for i, s in state["state"].items() for k, v in s.items()}
        ckpt.save_arrays(folder / ckpt.OPTIMIZER_FILE, arrays)
        groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
        (folder / "optimizer_groups.json").write_text(json.dumps(groups))

    def read_weights(self, folder: Path) -> None:
        self.unet.load_state_dict(load_file(str(folder / ckpt.UNET / WEIGHTS_FILE)), strict=True)
        if self.ema is not None:
            ema = load_file(str(folder / ckpt.UNET_EMA / WEIGHTS_FILE))
            self.ema = [ema[n].to(self.device) for n in self.trainable]

    def read_optimizer(self, folder: Path) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in ckpt.load_arrays(folder / ckpt.OPTIMIZER_FILE).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
        groups = json.loads((folder / "optimizer_groups.json").read_text())
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def export_pipeline(self, folder: Path) -> None:
        from diffusion_core.torch import DDPMPipeline

        DDPMPipeline(unet=self.ema_model(), scheduler=self.noise_scheduler).save_pretrained(folder)
