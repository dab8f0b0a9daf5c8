"""``diffusion-core train --model SD --data CAPTIONED [--lora-rank R]`` end to end on the tiny SD pipeline and a
4-image captioned folder, and its one-line errors (exit status 2)."""

from __future__ import annotations

import pytest

from diffusion_core import cli
from tests.pipelines import sd_tiny
from tests.training import t2i_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_t2i")
    return sd_tiny.save_sd_pipeline(root / "sd"), t2i_tiny.write_folder(root / "data")


def train(sd, data, out, *extra: str, backend: str = "torch") -> int:
    args = ["train", "--model", str(sd), "--data", str(data), "--output-dir", str(out), "--backend", backend]
    return cli.main([*args, "--steps", "3", "--batch-size", "2", "--checkpoint-every", "2", "--no-progress", *extra])


@pytest.mark.parametrize("backend", ["torch", pytest.param("flax", marks=pytest.mark.slow)])
def test_lora_run_writes_a_lora_diffusers_loads(folders, tmp_path, backend, capsys):
    sd, data = folders
    assert train(sd, data, tmp_path, "--lora-rank", "4", "--lora-alpha", "8", backend=backend) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "model_index.json").exists()
    ref = sd_tiny.load_diffusers(sd)
    ref.load_lora_weights(tmp_path)
    assert ref.get_active_adapters() == ["default_0"]
    assert train(sd, data, tmp_path, "--lora-rank", "4", "--lora-alpha", "8", "--resume", backend=backend) == 0


@pytest.mark.slow  # the fine-tuning itself is covered in test_text_to_image_torch
def test_full_finetune_writes_a_pipeline_folder(folders, tmp_path):
    sd, data = folders
    assert train(sd, data, tmp_path) == 0
    assert type(sd_tiny.load_diffusers(tmp_path)).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-rank", "4"], "--lora-rank: needs --model"),
        (["--lora-alpha", "2"], "--lora-alpha: needs --model"),
    ],
)
def test_lora_options_need_a_model(folders, tmp_path, capsys, extra, message):
    _, data = folders
    assert cli.main(["train", "--data", str(data), "--output-dir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-alpha", "2"], "--lora-alpha: needs --lora-rank"),
        (["--lora-rank", "0"], "--lora-rank: expected a positive integer"),
        (["--lora-rank", "2", "--lora-alpha", "-1"], "--lora-alpha: expected a number > 0"),
        (["--config", "unet.json"], "--config: not used with --model"),
    ],
)
def test_bad_text_to_image_arguments(folders, tmp_path, capsys, extra, message):
    sd, data = folders
    assert train(sd, data, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_data_must_be_captioned(folders, tmp_path, capsys):
    sd, _ = folders
    (tmp_path / "plain").mkdir()
    assert train(sd, tmp_path / "plain", tmp_path / "out", "--lora-rank", "2") == 2
    assert "--data: with --model, a folder of images with metadata.jsonl" in capsys.readouterr().err
