"""``diffusion-core`` end to end on tiny inputs, and its one-line errors (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_core import cli
from tests.training import tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8x8 images in sub-folders."""
    root = tmp_path_factory.mktemp("imgs")
    ds = tiny.dataset(8)
    for i, (im, label) in enumerate(zip(ds.images, ds.labels, strict=True)):
        folder = root / f"class{label % 2}"
        folder.mkdir(exist_ok=True)
        rgb = np.repeat(((im[0] + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=-1)
        Image.fromarray(rgb).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    config = tmp_path_factory.mktemp("cfg") / "unet.json"
    config.write_text(json.dumps({**tiny.TINY_UNET, "in_channels": 3, "out_channels": 3, "num_class_embeds": 2}))
    args = [
        "train",
        "--data",
        str(image_folder),
        "--output-dir",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--size",
        "8",
        "--config",
        str(config),
        "--checkpoint-every",
        "2",
        "--sample-every",
        "2",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    return out


def test_train_writes_a_pipeline_folder_with_checkpoints(trained):
    assert (trained / "model_index.json").is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["step-000002.png"]


def test_generate_grid_and_output_dir(trained, tmp_path):
    grid = tmp_path / "grid.png"
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(trained),
                "--class",
                "1",
                "--num-images",
                "4",
                "--steps",
                "2",
                "--grid",
                str(grid),
            ]
        )
        == 0
    )
    assert Image.open(grid).size == (16, 16)
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(trained),
                "--class",
                "0",
                "--class",
                "1",
                "--num-images",
                "3",
                "--steps",
                "2",
                "--scheduler",
                "EulerDiscreteScheduler",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000.png", "0001.png", "0002.png"]


def test_info(trained, capsys):
    assert cli.main(["info", str(trained)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pipeline"] == "DDPMPipeline"
    assert info["components"]["unet"]["classes"] == 2 and info["components"]["unet"]["parameters"] > 0


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["generate", "--steps", "0", "--grid", "x.png"], "--steps"),
        (["generate", "--num-images", "-2", "--grid", "x.png"], "--num-images"),
        (["generate", "--backend", "jax", "--grid", "x.png"], "--backend"),
        (["generate"], "--grid"),
        (["train", "--output-dir", "o"], "--data"),
        (["train", "--data", "no/such/folder", "--output-dir", "o"], "--data"),
        (["train", "--data", "digits", "--output-dir", "o", "--batch-size", "x"], "--batch-size"),
        (["info", "no/such/folder"], "model"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(args, names, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "Traceback" not in err


def test_bad_class_and_scheduler(trained, capsys):
    cases = (
        (["--class", "7"], "--class: this model has classes 0 to"),
        (["--class", "0", "--scheduler", "N"], "--scheduler"),
    )
    for extra, name in cases:
        assert cli.main(["generate", "--model", str(trained), "--grid", "g.png", "--steps", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "diffusion_core", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "Examples" in out.stdout


@pytest.mark.slow  # a flax compile of the sampling loop
def test_generate_on_flax_and_torch_give_images_of_one_shape(trained, tmp_path):
    common = ["--model", str(trained), "--class", "1", "--num-images", "2", "--steps", "2"]
    images = {}
    for backend in ("torch", "flax"):
        out = tmp_path / backend
        assert cli.main(["generate", *common, "--backend", backend, "--output-dir", str(out)]) == 0
        images[backend] = np.stack([np.asarray(Image.open(p)) for p in sorted(out.iterdir())])
    assert images["torch"].shape == images["flax"].shape == (2, 8, 8, 3)


def test_generate_without_class_cycles_every_class(tmp_path):
    """A new user's first call needs no --class: the shipped model draws each class in turn."""
    assert cli.main(["generate", "--num-images", "3", "--steps", "2", "--output-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_class_dropout_trains_a_no_class_label_that_generate_guides_with(image_folder, tmp_path, capsys):
    """``train --class-dropout``: one more class embedding (the "no class" label) and ``classes.json``;
    ``generate`` then guides with it by default and with ``--guidance``, never draws it as a class, and
    ``info`` names the classes."""
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--output-dir", str(out), "--steps", "2", "--batch-size", "4"]
    assert cli.main([*args, "--size", "8", "--class-dropout", "0.5", "--no-progress"]) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 3
    assert json.loads((out / "classes.json").read_text()) == {
        "class_names": ["class0", "class1"],
        "unconditional_class_label": 2,
    }
    grids = {}
    for guidance in (None, "1", "4"):
        grid = tmp_path / f"g{guidance}.png"
        flags = [] if guidance is None else ["--guidance", guidance]
        run = ["generate", "--model", str(out), "--num-images", "2", "--steps", "2", "--grid", str(grid), *flags]
        assert cli.main(run) == 0
        grids[guidance] = np.asarray(Image.open(grid)).astype(int)
    assert np.abs(grids["1"] - grids["4"]).max() > 0  # guidance changes the images
    assert np.abs(grids[None] - grids["4"]).max() > 0 and np.abs(grids[None] - grids["1"]).max() > 0  # default: 2
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out), "--class", "2", "--grid", "x.png", "--steps", "1"]) == 2
    assert "--class: this model has classes 0 to 1, got [2]" in capsys.readouterr().err
    assert cli.main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_names"] == ["class0", "class1"] and info["unconditional_class_label"] == 2


def test_class_dropout_needs_classes_and_the_extra_embedding(image_folder, tmp_path, capsys):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({**tiny.TINY_UNET, "in_channels": 3, "out_channels": 3, "num_class_embeds": 2}))
    args = ["train", "--data", str(image_folder), "--output-dir", str(tmp_path / "o"), "--steps", "1", "--size", "8"]
    assert cli.main([*args, "--config", str(config), "--class-dropout", "0.1"]) == 2
    assert "class_dropout: the UNet needs num_class_embeds=3" in capsys.readouterr().err
    assert cli.main([*args, "--class-dropout", "1.5"]) == 2
    assert "class_dropout must be a number in [0, 1)" in capsys.readouterr().err
