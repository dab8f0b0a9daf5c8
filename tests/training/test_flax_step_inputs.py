"""The Flax train step takes the frozen weights as an input: a LoRA run on a full-size UNet must not bake the whole
base model into the compiled program as constants (compile memory and time grow with the model otherwise)."""

from __future__ import annotations

import jax
import numpy as np

from diffusion_core import training
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.training_text import TextToImageTrainer
from tests.pipelines import sd_tiny


def test_lora_step_takes_the_frozen_unet_as_an_argument(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(sd_tiny.save_sd_pipeline(tmp_path / "sd"))
    config = training.TrainConfig(batch_size=2, ema=None)
    trainer = TextToImageTrainer(pipe, config, lora=training.LoraTrainConfig(rank=2))
    rng = np.random.default_rng(0)
    data = training.ImageDataset(
        rng.standard_normal((2, 4, 16, 16)).astype(np.float32), None, (), rng.standard_normal((2, 77, 8)).astype("f4")
    )
    batch = trainer._place(training.step_batch(data, 0, 2, 0, 1000))
    args = (trainer.params, trainer.rest, trainer.opt_state, trainer.ema, batch, np.float32(1e-3), np.float32(0))
    closed = jax.make_jaxpr(trainer._step_fn)(*args)
    frozen = {tuple(leaf.shape) for leaf in jax.tree.leaves(trainer.rest) if leaf.ndim >= 2}
    assert frozen  # the base UNet's kernels are frozen state in a LoRA run
    baked = [c.shape for c in closed.consts if hasattr(c, "shape") and tuple(c.shape) in frozen]
    assert baked == []
    # and the step reads them: other frozen weights give another loss
    loss = trainer._step(*args)[-1]
    zeroed = jax.tree.map(lambda a: a * 0 if a.ndim >= 2 else a, trainer.rest)
    assert float(trainer._step(trainer.params, zeroed, *args[2:])[-1]) != float(loss)
