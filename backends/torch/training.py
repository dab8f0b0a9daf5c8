"""PyTorch trainer: AdamW, global-norm clipping, gradient accumulation, bf16 autocast, EMA, exact resume, DDP.

The losses, rates, decays, data order and checkpoint layout come from ``diffusion_core.training``;
this module binds them to ``torch.optim.AdamW`` and an ``nn.Module`` UNet. Under torchrun (an active
``torch.distributed`` group of several processes) the UNet runs inside ``DistributedDataParallel`` and each
process takes its contiguous share of every step's global batch; the loss is weighted so that the averaged
gradient is the one-process gradient of the whole batch (any batch size, uneven shares included).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffusion_core import training as core
from diffusion_core.data_parallel import process_share
from diffusion_core.torch import distributed
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
        self.model = self._data_parallel(unet)  # what runs the forward pass: the UNet, or DDP around it

    def _data_parallel(self, unet: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(unet)`` under an active group of several processes (it broadcasts rank 0's
        weights), else ``unet``; checks that every process gets a micro-batch at each accumulation step."""
        processes = distributed.world_size()
        if processes == 1:
            return unet
        cfg = self.config
        if cfg.batch_size < processes * cfg.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size ({cfg.batch_size}) must be at least gradient_accumulation_steps "
                f"({cfg.gradient_accumulation_steps}) x processes ({processes})"
            )
        device = self.device
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(unet, device_ids=ids)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or one process): the process that writes checkpoints, logs, samples and the pipeline."""
        return distributed.is_main_process()

    def wait_for_everyone(self) -> None:
        distributed.barrier()

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
            out = self.model(noisy, t, *text, class_labels=y)
        return core.diffusion_loss(
            self.noise_scheduler, out.float(), x0, eps, t, self.prediction_type, self.config.snr_gamma
        )

    def train_step(self, batch: StepBatch, lr: float, decay: float) -> float:
        """One optimisation step over ``batch`` (the global batch: this process takes its share, split into
        accumulation micro-batches); returns the mean loss over the global batch."""
        cfg = self.config
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        mine = distributed.local_share(len(batch.images))  # every process's share, in rank order, is the batch
        local, total, steps = mine.stop - mine.start, 0.0, cfg.gradient_accumulation_steps
        for i in range(steps):
            micro = process_share(local, i, steps)
            part = slice(mine.start + micro.start, mine.start + micro.stop)
            labels = None if batch.labels is None else batch.labels[part]
            context = None if batch.conditioning is None else batch.conditioning[part]
            # weight len/B x processes (one process: 1/accumulation steps): DDP's mean over the processes then
            # gives the whole batch's mean gradient, however the batch split
            divisor = len(batch.images) / ((micro.stop - micro.start) * distributed.world_size())
            with self._sync(last=i == steps - 1):
                loss = self.loss(batch.images[part], batch.noise[part], batch.timesteps[part], labels, context)
                (loss / divisor).backward()
            total += float(loss.detach()) / divisor
        total = distributed.all_reduce_sum(total) / distributed.world_size()
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

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients over the processes at the last micro-batch only (``no_sync`` before it)."""
        if last or self.model is self.unet:
            return contextlib.nullcontext()
        return self.model.no_sync()

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
