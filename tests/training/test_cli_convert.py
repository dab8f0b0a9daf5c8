"""``diffusion-core convert`` (single file -> diffusers folder, ``--verify``) and ``info`` on a Hub id, offline.

The single files come from random-weight diffusers / transformers components written in the CompVis layout
(``tests.compvis_layout``); diffusers itself is the oracle that the written folder holds the source weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch

from diffusion_core import cli
from tests.compvis_layout import Pipe
from tests.pipelines import tiny

REPO = "tiny-org/tiny-sd"


def _reference_folder(pipe: Pipe, root: Path) -> Path:
    """A diffusers SD pipeline folder around ``pipe``'s configs, with a safety checker the single file lacks."""
    ref = root / f"ref_{pipe.folder.name}"
    shutil.copytree(pipe.folder, ref)
    pipe.text_encoder.save_pretrained(ref / "text_encoder")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(ref / "scheduler")
    (ref / "tokenizer").mkdir()
    (ref / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    (ref / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0}))
    (ref / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (ref / "safety_checker").mkdir()
    (ref / "safety_checker" / "config.json").write_text("{}")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": [None, None],
        "requires_safety_checker": True,
    }
    (ref / "model_index.json").write_text(json.dumps(index))
    return ref


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> tuple[Pipe, Path]:
    root = tmp_path_factory.mktemp("convert")
    pipe = Pipe(root, "sd1", "clip")
    return pipe, _reference_folder(pipe, root)


@pytest.fixture
def hub(tmp_path, monkeypatch, sd1):
    """``sd1``'s reference laid out in an offline Hub cache as ``REPO``."""
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, REPO, sd1[1])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def _assert_holds(folder: Path, pipe: Pipe) -> None:
    """diffusers loads each converted component with exactly the source weights."""
    loaders = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}
    for name, cls in loaders.items():
        state = cls.from_pretrained(folder, subfolder=name).state_dict()
        for key, value in pipe.states[name].items():
            np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_convert_writes_a_folder_diffusers_loads(sd1, tmp_path, capsys):
    pipe, ref = sd1
    out = tmp_path / "out"
    assert cli.main(["convert", str(pipe.path), str(out), "--config", str(ref)]) == 0
    _assert_holds(out, pipe)
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "scheduler").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside
    assert "safety_checker: not in a single-file checkpoint" in capsys.readouterr().out


def test_convert_with_a_hub_reference_and_verify(sd1, hub, tmp_path, capsys):
    pipe, _ = sd1
    out = tmp_path / "verified"
    assert cli.main(["convert", str(pipe.path), str(out), "--config", REPO, "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified in torch and flax: unet (" in printed and "text_encoder (" in printed
    _assert_holds(out, pipe)
    assert (out / "tokenizer" / "vocab.json").is_file()  # only the reference's configs came from the cache


def test_verify_catches_a_changed_tensor(sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusion_core.cli_convert import convert, verify

    pipe, ref = sd1
    out = convert(str(pipe.path), str(tmp_path / "o"), str(ref), log=lambda _: None)
    path = out / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    state[key] = state[key] + torch.ones_like(state[key])
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"--verify: vae tensor '{key}'"):
        verify(str(pipe.path), str(out))


def test_info_on_a_hub_id_reads_the_cache(sd1, hub, capsys):
    assert cli.main(["info", REPO]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pipeline"] == "StableDiffusionPipeline"
    unet = info["components"]["unet"]
    assert unet["parameters"] == sum(v.size for v in sd1[0].states["unet"].values()) and unet["dtypes"] == ["F32"]
    assert info["total_bytes"] > 0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no_file", "checkpoint: no such file"),
        ("pickle", "checkpoint: 'model.ckpt' is a pickle checkpoint; pass --allow-pickle"),
        ("broken", "checkpoint: "),
        ("exists", "output_dir:"),
        ("no_config", "--config"),
        ("bad_config", "--config: path_or_repo_id: no such folder"),
        ("mismatch", "--config: the reference's unet does not fit"),
    ],
)
def test_convert_errors_are_one_line(sd1, tmp_path, capsys, case, needle):
    pipe, ref = sd1
    out = tmp_path / "o"
    args = ["convert", str(pipe.path), str(out), "--config", str(ref)]
    if case == "no_file":
        args[1] = str(tmp_path / "missing.safetensors")
    elif case in ("pickle", "broken"):
        args[1] = str(tmp_path / ("model.ckpt" if case == "pickle" else "broken.safetensors"))
        Path(args[1]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif case == "exists":
        out.mkdir()
    elif case == "no_config":
        args = args[:3]
    elif case == "bad_config":
        args[-1] = "./nope"
    else:
        other = Pipe(tmp_path, "sd2", "open_clip")
        args[1] = str(other.path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert case == "exists" or not out.exists()
