"""Flax NNX trainer: one jitted optax step (clipping, AdamW, gradient accumulation, EMA), data parallel on a Mesh.

The losses, rates, decays, data order and checkpoint layout come from ``diffusion_core.training``; this
module binds them to optax and an ``nnx`` UNet. Parameters and optimiser state are float32 master
copies; ``mixed_precision="bf16"`` runs the network in bfloat16. With ``mesh=`` the batch is sharded
over the mesh's first axis and the parameters are replicated: the same program on one device or eight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from diffusion_core import training as core
from diffusion_core.flax.models.loading import load_torch_state_dict
from diffusion_core.training import checkpoint as ckpt
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import StepBatch
from diffusion_core.training.loop import FitMixin

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping then AdamW's direction; the step multiplies by ``-lr`` itself (the rate is a step argument)."""
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm is not None else []
    parts.append(optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    return optax.chain(*parts)


def accumulated_value_and_grad(loss_fn: Any, params: Any, batch: tuple, accum: int) -> tuple[jax.Array, Any]:
    """Mean (loss, grads) of ``loss_fn(params, *micro)`` over ``accum`` equal slices of ``batch`` (leading axis).

    A Python loop, not ``lax.scan``: XLA:CPU runs the UNet's convolutions inside a while loop ~30x slower
    (measured: one digits step at batch 32, 27 s in a scan, 0.8 s straight; see benchmarks/RESULTS.md).
    """
    size = next(a for a in batch if a is not None).shape[0] // accum
    total = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    for i in range(accum):
        part = slice(i * size, (i + 1) * size)
        micro = jax.tree.map(lambda a, part=part: a[part], batch)  # (B/A, ...); None labels stay None
        total = jax.tree.map(jnp.add, total, jax.value_and_grad(loss_fn)(params, *micro))
    return jax.tree.map(lambda a: a / accum, total)


class Trainer(FitMixin):
    """``Trainer(unet, noise_scheduler, config, mesh=None).fit(dataset, steps=..., output_dir=...)``."""

    trainable: Any = nnx.Param  # the nnx filter of what the optimiser updates (a LoRA run: its factors only)

    def __init__(
        self, unet: nnx.Module, noise_scheduler: Any, config: TrainConfig | None = None, mesh: Mesh | None = None
    ) -> None:
        self.unet, self.noise_scheduler, self.mesh = unet, noise_scheduler, mesh
        self.config = config if config is not None else TrainConfig()
        self.prediction_type = self.config.prediction_type or core.scheduler_prediction_type(noise_scheduler)
        self.graphdef, self.params, self.rest = nnx.split(unet, self.trainable, ...)
        self.tx = make_optimizer(self.config)
        self.opt_state = self.tx.init(self.params)
        self.ema = jax.tree.map(jnp.copy, self.params) if self.config.ema is not None else None
        self._step = jax.jit(self._step_fn)  # no donation: restored optimiser leaves may share buffers
        self._sampler: Any = None  # one DDIM pipeline, so its compiled program is reused grid after grid

    def _loss_fn(self, params, rest, x0, noise, timesteps, labels, context=None):
        """Scalar loss of one micro-batch as a function of the trainable parameters; ``rest`` is the frozen state
        (a LoRA run: the whole base UNet), an argument of the compiled step rather than a constant baked into it
        (``context``: the text context (B, L, D) a UNet2DConditionModel takes as ``encoder_hidden_states``)."""
        compute = params
        if self.config.mixed_precision == "bf16":
            compute = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        model = nnx.merge(self.graphdef, compute, rest)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        dtype = jnp.bfloat16 if self.config.mixed_precision == "bf16" else x0.dtype
        text = () if context is None else (context.astype(dtype),)
        out = model(noisy.astype(dtype), timesteps, *text, class_labels=labels).astype(jnp.float32)
        return core.diffusion_loss(
            self.noise_scheduler, out, x0, noise, timesteps, self.prediction_type, self.config.snr_gamma
        )

    def loss_and_grads(self, images, noise, timesteps, labels=None, context=None):
        """(loss, grads) of one batch at the current parameters (grads: an ``nnx.State`` like the params)."""
        args = (
            jnp.asarray(images),
            jnp.asarray(noise),
            jnp.asarray(timesteps),
            None if labels is None else jnp.asarray(labels),
            None if context is None else jnp.asarray(context),
        )
        return jax.jit(jax.value_and_grad(self._loss_fn))(self.params, self.rest, *args)

    def _step_fn(self, params, rest, opt_state, ema, batch, lr, decay):
        def loss_fn(p, *micro):
            return self._loss_fn(p, rest, *micro)

        loss, grads = accumulated_value_and_grad(loss_fn, params, batch, self.config.gradient_accumulation_steps)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    def _place(self, batch: StepBatch) -> tuple:
        arrays = (batch.images, batch.noise, batch.timesteps.astype(np.int32))
        arrays += (None if batch.labels is None else batch.labels.astype(np.int32), batch.conditioning)
        if self.mesh is None:
            return tuple(None if a is None else jnp.asarray(a) for a in arrays)
        spec = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        return tuple(None if a is None else jax.device_put(a, spec) for a in arrays)

    def train_step(self, batch: StepBatch, lr: float, decay: float) -> float:
        """One optimisation step; returns the mean loss over the batch."""
        if self.mesh is not None and not getattr(self, "_replicated", False):
            rep = NamedSharding(self.mesh, PartitionSpec())
            placed = jax.device_put((self.params, self.rest, self.opt_state, self.ema), rep)
            self.params, self.rest, self.opt_state, self.ema = placed
            self._replicated = True
        lr32, decay32 = np.float32(lr), np.float32(decay)
        self.params, self.opt_state, self.ema, loss = self._step(
            self.params, self.rest, self.opt_state, self.ema, self._place(batch), lr32, decay32
        )
        return float(loss)

    def model(self, ema: bool = False) -> nnx.Module:
        """The UNet with the current (or the EMA) weights."""
        params = self.ema if ema and self.ema is not None else self.params
        return nnx.merge(self.graphdef, params, self.rest)

    def sample_images(
        self, num_images: int, class_labels: np.ndarray | None, num_inference_steps: int, seed: int
    ) -> np.ndarray:
        """(B, H, W, C) images in [0, 1] from the EMA weights with DDIM; image i starts from fold_in(key(seed), i)."""
        from diffusion_core.flax import DDIMPipeline

        if self._sampler is None:
            self._sampler = DDIMPipeline(unet=self.model(ema=True), scheduler=self.noise_scheduler)
            self._sampler.set_progress_bar_config(disable=True)
        else:
            self._sampler.unet = self.model(ema=True)
        out = self._sampler(
            batch_size=num_images,
            key=jax.random.key(seed),
            num_inference_steps=num_inference_steps,
            output_type="np",
            class_labels=class_labels,
        )
        return out.images

    def write_state(self, folder: Path) -> None:
        self.write_weights(folder)
        self.write_optimizer(folder)

    def read_state(self, folder: Path) -> None:
        self.read_weights(folder)
        self.read_optimizer(folder)

    def write_weights(self, folder: Path) -> None:
        """The trained weights (and their EMA) into a checkpoint folder."""
        self.model().save_pretrained(folder / ckpt.UNET)
        if self.ema is not None:
            self.model(ema=True).save_pretrained(folder / ckpt.UNET_EMA)

    def write_optimizer(self, folder: Path) -> None:
        leaves = jax.tree_util.tree_flatten_with_path(self.opt_state)[0]
        arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}  # named by path, not position
        ckpt.save_arrays(folder / ckpt.OPTIMIZER_FILE, arrays)

    def _load_params(self, path: Path) -> nnx.State:
        # a clone: merge can hand back the very Variables of self.params, which loading would overwrite
        model = nnx.clone(self.model())
        load_torch_state_dict(model, load_file(str(path)))
        return nnx.split(model, self.trainable, ...)[1]

    def read_weights(self, folder: Path) -> None:
        self.params = self._load_params(folder / ckpt.UNET / WEIGHTS_FILE)
        if self.ema is not None:
            self.ema = self._load_params(folder / ckpt.UNET_EMA / WEIGHTS_FILE)

    def read_optimizer(self, folder: Path) -> None:
        saved = ckpt.load_arrays(folder / ckpt.OPTIMIZER_FILE)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        restored = []
        for path, leaf in leaves:
            value = saved[jax.tree_util.keystr(path)]
            if value.shape != leaf.shape:
                raise ValueError(f"resume: optimizer state {jax.tree_util.keystr(path)} has shape {value.shape}")
            restored.append(jnp.asarray(value, dtype=leaf.dtype))
        self.opt_state = jax.tree.unflatten(treedef, restored)
        self._replicated = False

    def export_pipeline(self, folder: Path) -> None:
        from diffusion_core.flax import DDPMPipeline

        DDPMPipeline(unet=self.model(ema=True), scheduler=self.noise_scheduler).save_pretrained(folder)
