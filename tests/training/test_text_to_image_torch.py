"""Text-to-image fine-tuning and LoRA training (PyTorch) on the tiny SD pipeline: the loss falls, resume is exact,
the fine-tuned folder and the LoRA file load in diffusers 0.42.1, and diffusers' image with the trained LoRA equals
ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from diffusion_core import training
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.training_text import TextToImageTrainer, encode_dataset
from tests.pipelines import lora_tiny, sd_tiny
from tests.training import t2i_tiny

ATOL = 2e-3
EFFECT = 50 * ATOL
LORA = training.LoraTrainConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    torch.set_num_threads(1)
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("t2i") / "sd")


def load(folder) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dataset(sd_folder):
    return encode_dataset(load(sd_folder), t2i_tiny.captioned())


def test_captioned_folder_reads_what_was_written(tmp_path):
    folder = t2i_tiny.write_folder(tmp_path / "data")
    data = training.load_captioned_folder(folder, t2i_tiny.SIZE)
    assert data.captions == t2i_tiny.captioned().captions
    np.testing.assert_allclose(data.images, t2i_tiny.captioned().images, atol=1 / 127.5)
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        training.load_captioned_folder(folder, t2i_tiny.SIZE)
    (folder / "metadata.jsonl").write_text('{"file": "0.png"}\n')
    with pytest.raises(ValueError, match="line 1 needs str 'file_name' and 'text'"):
        training.load_captioned_folder(folder, t2i_tiny.SIZE)
    with pytest.raises(ValueError, match="captions: 1 captions for 4 images"):
        training.captioned_images(t2i_tiny.images(), ["one"])


def test_dataset_is_vae_latents_and_clip_context(sd_folder, dataset):
    ref = sd_tiny.load_diffusers(sd_folder)
    x = torch.from_numpy(t2i_tiny.captioned().images)
    ids = ref.tokenizer(list(t2i_tiny.CAPTIONS), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = ref.vae.encode(x).latent_dist.mode() * ref.vae.config.scaling_factor
        context = ref.text_encoder(ids)[0]
    np.testing.assert_allclose(dataset.images, latents.numpy(), atol=1e-5)
    np.testing.assert_allclose(dataset.conditioning, context.numpy(), atol=1e-5)


def test_finetune_loss_falls_and_output_loads_in_diffusers(sd_folder, dataset, tmp_path):
    config = training.TrainConfig(batch_size=4, learning_rate=1e-2, seed=1)
    losses = TextToImageTrainer(load(sd_folder), config).fit(dataset, 30, tmp_path, progress=False)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    ref = sd_tiny.load_diffusers(tmp_path)
    trained = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(v.numpy(), trained[k]) for k, v in load(sd_folder).unet.state_dict().items())
    for key, value in ref.unet.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), trained[key])
    assert type(ref).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_resume_is_exact(sd_folder, dataset, tmp_path, lora):
    config = training.TrainConfig(batch_size=2, learning_rate=1e-2, seed=3)
    straight = TextToImageTrainer(load(sd_folder), config, lora=lora)
    straight.fit(dataset, 4, tmp_path / "a", progress=False)
    TextToImageTrainer(load(sd_folder), config, lora=lora).fit(dataset, 2, tmp_path / "b", 2, progress=False)
    resumed = TextToImageTrainer(load(sd_folder), config, lora=lora)
    resumed.fit(dataset, 4, tmp_path / "b", 2, resume=True, progress=False)
    for name, value in straight.trainable.items():
        torch.testing.assert_close(resumed.trainable[name], value, rtol=0, atol=0)
    for a, b in zip(straight.ema, resumed.ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trained_lora_loads_in_diffusers_with_our_image(sd_folder, dataset, tmp_path):
    pipe = load(sd_folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = training.TrainConfig(batch_size=4, learning_rate=5e-2, seed=1, ema=None)
    TextToImageTrainer(pipe, config, lora=LORA).fit(dataset, 20, tmp_path, progress=False)
    for key, value in before.items():  # the base stays frozen
        torch.testing.assert_close(pipe.unet.state_dict()[key], value, rtol=0, atol=0)
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    in_training = lora_tiny.run(pipe)
    ours = load(sd_folder)
    base = lora_tiny.run(ours)
    ours.load_lora_weights(tmp_path)
    image = lora_tiny.run(ours)
    assert np.abs(image - base).max() > EFFECT
    np.testing.assert_allclose(image, in_training, atol=1e-5, rtol=0)
    ref = sd_tiny.load_diffusers(sd_folder)
    ref.load_lora_weights(tmp_path)
    np.testing.assert_allclose(image, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_resume_with_other_adapters_is_an_error(sd_folder, dataset, tmp_path):
    config = training.TrainConfig(batch_size=2, seed=3, ema=None)
    TextToImageTrainer(load(sd_folder), config, lora=LORA).fit(dataset, 1, tmp_path, progress=False)
    other = TextToImageTrainer(load(sd_folder), config, lora=training.LoraTrainConfig(rank=2, alpha=8))
    with pytest.raises(ValueError, match="resume: .* holds other adapters"):
        other.fit(dataset, 2, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "lora rank must be a positive int"),
        ({"alpha": -1.0}, "lora alpha must be a number > 0"),
        ({"target_modules": "to_q"}, "target_modules must be a non-empty tuple"),
    ],
)
def test_lora_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        training.LoraTrainConfig(**kwargs)


def test_bad_inputs(sd_folder):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="pipe: not a Stable Diffusion pipeline"):
        TextToImageTrainer(SimpleNamespace(unet=object()))
    with pytest.raises(ValueError, match="target_modules: no Linear layer ends with any of \\['nope'\\]"):
        TextToImageTrainer(load(sd_folder), lora=training.LoraTrainConfig(target_modules=("nope",)))
