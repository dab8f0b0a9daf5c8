"""Text-to-image fine-tuning and LoRA training (Flax / optax) on the tiny SD pipeline: the trained LoRA loads in
diffusers 0.42.1 with our image and a new adapter weight does not recompile; the loss falls; resume is exact.
Slow: each trainer compiles its step (~40 s on these CPUs)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from diffusion_core import training
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.training_text import TextToImageTrainer, encode_dataset
from tests.pipelines import lora_tiny, sd_tiny
from tests.training import t2i_tiny

pytestmark = pytest.mark.slow

ATOL = 5e-3
EFFECT = 20 * ATOL
LORA = training.LoraTrainConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("t2i") / "sd")


def load(folder) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dataset(sd_folder):
    return encode_dataset(load(sd_folder), t2i_tiny.captioned())


def test_dataset_matches_torch(sd_folder, dataset):
    from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline as TorchPipeline
    from diffusion_core.torch.training_text import encode_dataset as torch_encode

    expected = torch_encode(TorchPipeline.from_pretrained(sd_folder), t2i_tiny.captioned())
    np.testing.assert_allclose(dataset.images, expected.images, atol=1e-4)
    np.testing.assert_allclose(dataset.conditioning, expected.conditioning, atol=1e-4)


def test_trained_lora_loads_in_diffusers_and_new_weight_does_not_recompile(sd_folder, dataset, tmp_path):
    pipe = load(sd_folder)
    config = training.TrainConfig(batch_size=4, learning_rate=5e-2, seed=1, ema=None)
    trainer = TextToImageTrainer(pipe, config, lora=LORA)
    base_before = nnx.state(pipe.unet, nnx.Param)
    trainer.fit(dataset, 20, tmp_path, progress=False)
    frozen = trainer.model()
    for a, b in zip(jax_leaves(base_before), jax_leaves(nnx.state(frozen, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)  # the base stays frozen
    ours = load(sd_folder)
    base = lora_tiny.run(ours)
    ours.load_lora_weights(tmp_path, adapter_name="trained")
    image = lora_tiny.run(ours)
    assert np.abs(image - base).max() > EFFECT
    ref = sd_tiny.load_diffusers(sd_folder)
    ref.load_lora_weights(tmp_path, adapter_name="trained")
    np.testing.assert_allclose(image, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)
    traced = ours.trace_count
    for weight in (0.0, 0.5):  # adapter weights are program inputs: no new trace, no compile
        ours.set_adapters("trained", weight)
        ref.set_adapters("trained", weight)
        other = lora_tiny.run(ours)
        assert ours.trace_count == traced and ours.last_compile_seconds == 0.0
        np.testing.assert_allclose(other, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)
        if weight == 0.0:
            np.testing.assert_allclose(other, base, atol=1e-5, rtol=0)  # far from ``image`` (checked above)


def jax_leaves(state) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_finetune_loss_falls_and_output_loads_in_diffusers(sd_folder, dataset, tmp_path):
    config = training.TrainConfig(batch_size=4, learning_rate=1e-2, seed=1)
    losses = TextToImageTrainer(load(sd_folder), config).fit(dataset, 30, tmp_path, progress=False)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert type(sd_tiny.load_diffusers(tmp_path)).__name__ == "StableDiffusionPipeline"


def test_lora_resume_is_exact(sd_folder, dataset, tmp_path):
    config = training.TrainConfig(batch_size=2, learning_rate=1e-2, seed=3)
    straight = TextToImageTrainer(load(sd_folder), config, lora=LORA)
    straight.fit(dataset, 4, tmp_path / "a", progress=False)
    TextToImageTrainer(load(sd_folder), config, lora=LORA).fit(dataset, 2, tmp_path / "b", 2, progress=False)
    resumed = TextToImageTrainer(load(sd_folder), config, lora=LORA)
    resumed.fit(dataset, 4, tmp_path / "b", 2, resume=True, progress=False)
    for a, b in zip(
        jax_leaves((straight.params, straight.ema)), jax_leaves((resumed.params, resumed.ema)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
