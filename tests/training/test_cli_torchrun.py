"""``diffusion-core generate`` and ``train --backend torch`` under ``torchrun --nproc_per_node 2`` (gloo, CPU).

The images and trained weights equal one process's; only rank 0 writes files and prints (each rank's stdout is
captured by torchrun's ``--redirects``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from diffusion_core import cli
from tests.pipelines import tiny as pipelines_tiny
from tests.pipelines.test_torchrun import torchrun
from tests.training import tiny

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _stdout(logs, rank: int) -> str:
    (path,) = logs.rglob(f"{rank}/stdout.log")
    return path.read_text()


def _distributed(tmp_path, *args: str) -> tuple[str, str]:
    """Run ``diffusion-core args`` on two processes; returns the ranks' stdout."""
    logs = tmp_path / "logs"
    torchrun(2, "--redirects", "1", "--log-dir", logs, "-m", "diffusion_core", *args)
    return _stdout(logs, 0), _stdout(logs, 1)


def _pngs(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_generate_splits_the_images_and_rank0_writes_them(tmp_path):
    model = pipelines_tiny.save_diffusers_pipeline(
        tmp_path / "ddpm", unet={**pipelines_tiny.MINI_UNET, "num_class_embeds": 3}
    )
    common = ["generate", "--model", str(model), "--num-images", "5", "--steps", "2", "--seed", "4"]
    common += ["--scheduler", "DDPMScheduler"]  # step noise too
    rank0, rank1 = _distributed(tmp_path, *common, "--output-dir", str(tmp_path / "two"))
    assert rank1 == "" and len(rank0.split()) == 5
    assert cli.main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    two, one = _pngs(tmp_path / "two"), _pngs(tmp_path / "one")
    assert len(two) == len(one) == 5
    for got, want in zip(two, one, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding of float-equal images


def test_train_under_torchrun_equals_one_process(tmp_path):
    data = tmp_path / "data"
    ds = tiny.dataset(8)
    for i, (image, label) in enumerate(zip(ds.images, ds.labels, strict=True)):
        (data / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(((image[0] + 1) * 127.5).astype(np.uint8)[..., None], 3, -1)).save(
            data / f"class{label}/{i}.png"
        )
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({**tiny.TINY_UNET, "in_channels": 3, "out_channels": 3}))
    common = ["train", "--data", str(data), "--config", str(config), "--size", "8", "--steps", "3"]
    common += ["--batch-size", "5", "--checkpoint-every", "2", "--no-progress"]
    rank0, rank1 = _distributed(tmp_path, *common, "--output-dir", str(tmp_path / "two"))
    assert rank1 == "" and "trained 3 steps" in rank0
    assert cli.main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    want, got = load_file(tmp_path / "one" / WEIGHTS), load_file(tmp_path / "two" / WEIGHTS)
    for key, value in want.items():  # Adam turns round-off in near-zero gradients into small steps: 1e-3 of scale
        assert np.abs(got[key] - value).max() <= 1e-3 * np.abs(value).max(), key
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / "two/loss.csv", delimiter=",", skiprows=1),
        np.loadtxt(tmp_path / "one/loss.csv", delimiter=",", skiprows=1),
        rtol=1e-4,
    )


def test_flax_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["generate", "--backend", "flax", "--grid", "g.png", "--steps", "1"]) == 2
    assert "--backend: under torchrun the work splits over processes with torch, not flax" in capsys.readouterr().err


@pytest.mark.slow  # an SD fixture and three text-to-image runs (one under torchrun) per kind: ~40 s each here
@pytest.mark.parametrize("lora", [False, True], ids=["finetune", "lora"])
def test_text_to_image_train_under_torchrun_equals_one_process(tmp_path, lora):
    from tests.pipelines import sd_tiny
    from tests.training import t2i_tiny

    model, data = sd_tiny.save_sd_pipeline(tmp_path / "sd"), t2i_tiny.write_folder(tmp_path / "data", 4)
    common = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "4"]
    common += ["--no-progress", *(["--lora-rank", "2"] if lora else [])]
    rank0, rank1 = _distributed(tmp_path, *common, "--output-dir", str(tmp_path / "two"))
    assert rank1 == "" and "trained 2 steps" in rank0
    assert cli.main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    file = "pytorch_lora_weights.safetensors" if lora else WEIGHTS
    want, got = load_file(tmp_path / "one" / file), load_file(tmp_path / "two" / file)
    assert set(got) == set(want)
    for key, value in want.items():
        assert np.abs(got[key] - value).max() <= 1e-4 * np.abs(value).max(), key
