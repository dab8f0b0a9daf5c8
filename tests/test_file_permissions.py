"""Saved files and folders get the permissions of normally created ones under the user's umask.

diffusers writes 0644 files and 0755 folders under umask 022; an atomic save (temporary file or
folder, then rename) must not leave them private (``mkstemp``/``mkdtemp`` create 0600/0700).
Covered: model weights + config (single file and sharded with an index), scheduler config, and a
whole pipeline folder (``model_index.json``, every component, tokenizer files).
"""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.configuration import make_temp_dir_beside, write_json_atomic
from diffusion_core.weights import save_state_dict
from tests.pipelines import sd_tiny

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _assert_normal_modes(root: Path, umask: int) -> int:
    """Every folder under ``root`` (itself included) is 0777 & ~umask, every file 0666 & ~umask; returns the count."""
    assert _mode(root) == 0o777 & ~umask, f"{root}: {_mode(root):o}"
    count = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            assert _mode(Path(folder, name)) == 0o777 & ~umask, f"{folder}/{name}: {_mode(Path(folder, name)):o}"
        for name in files:
            assert _mode(Path(folder, name)) == 0o666 & ~umask, f"{folder}/{name}: {_mode(Path(folder, name)):o}"
            count += 1
    return count


def test_atomic_helpers_honour_the_umask(umask, tmp_path):
    write_json_atomic(tmp_path / "a" / "x.json", "{}\n")
    assert _mode(tmp_path / "a" / "x.json") == 0o666 & ~umask
    assert _mode(make_temp_dir_beside(tmp_path / "b")) == 0o777 & ~umask
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]  # no temporary file left behind


def test_state_dict_save_and_resave_honour_the_umask(umask, tmp_path):
    arrays = {f"w{i}": np.full((64,), i, np.float32) for i in range(3)}
    save_state_dict(arrays, tmp_path / "m", max_shard_size=300)  # 3 shards + index json
    assert _assert_normal_modes(tmp_path / "m", umask) == 4
    save_state_dict(arrays, tmp_path / "m")  # the swap of an existing folder keeps normal modes too
    assert _assert_normal_modes(tmp_path / "m", umask) == 1


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_model_save_pretrained_honours_the_umask(backend, umask, tmp_path):
    module = pytest.importorskip(f"diffusion_core.{backend}")
    vae = module.AutoencoderKL(**sd_tiny.SD_VAE)
    vae.save_pretrained(tmp_path / "vae")
    assert _assert_normal_modes(tmp_path / "vae", umask) == 2  # config.json + weights
    vae.save_pretrained(tmp_path / "vae", max_shard_size="20KB")
    assert _assert_normal_modes(tmp_path / "vae", umask) > 3


def test_scheduler_save_config_honours_the_umask(umask, tmp_path):
    path = schedulers.EulerDiscreteScheduler().save_config(tmp_path / "scheduler")
    assert _mode(path) == 0o666 & ~umask and _mode(path.parent) == 0o777 & ~umask


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    from diffusion_core.torch import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd"))


def test_pipeline_save_pretrained_honours_the_umask(sd_pipe, umask, tmp_path):
    out = sd_pipe.save_pretrained(tmp_path / "pipe")
    assert (out / "model_index.json").is_file() and (out / "tokenizer" / "vocab.json").is_file()
    assert _assert_normal_modes(out, umask) >= 8
    sd_pipe.save_pretrained(tmp_path / "pipe")  # over an existing folder
    assert _assert_normal_modes(out, umask) >= 8
