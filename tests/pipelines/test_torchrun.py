"""torchrun data-parallel generation: ``torchrun --nproc_per_node 2`` (gloo, CPU) gives the images of one process.

Each process enables ``pipe.enable_distributed()``, makes the same calls (``torchrun_calls``: DDPM class-conditional
with step noise, SD text to image with guidance and latents out, img2img) and must get the whole batch back, equal
to one process's, for per-image generators and for one generator; 5 and 3 images split unevenly over the ranks.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core.data_parallel import process_share
from diffusion_core.torch import distributed
from diffusion_core.torch.pipelines import DiffusionPipeline
from tests.pipelines import sd_tiny, tiny, torchrun_calls

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *program: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc [options] script args`` on a free port, CPU, 1 thread
    each; ``program`` may start with torchrun's own options (``-m``, ``--redirects``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, program)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    ddpm = tiny.save_diffusers_pipeline(root / "ddpm", unet={**tiny.MINI_UNET, "num_class_embeds": 3})
    sd = sd_tiny.save_sd_pipeline(root / "sd")
    img2img = sd_tiny.save_sd_pipeline(root / "img2img", "StableDiffusionImg2ImgPipeline")
    return ddpm, sd, img2img


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: SD has a rank with no image
def test_torchrun_gives_the_images_of_one_process(folders, tmp_path, nproc):
    torchrun(nproc, ROOT / "tests/pipelines/torchrun_calls.py", *folders, tmp_path)
    single = torchrun_calls.run_calls(folders, distributed=False)
    assert single["sd_ancestral"].shape[0] == 4
    rows = single.pop("unet_rows")
    shares = []
    for rank in range(nproc):
        got = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert int(got.pop("world_size")) == nproc
        shares.append(int(got.pop("unet_rows")))
        assert set(got) == set(single)
        for name, images in single.items():
            np.testing.assert_allclose(got[name], images, rtol=1e-5, atol=1e-5, err_msg=f"{name}, rank {rank}")
    assert sum(shares) == rows and max(shares) < rows  # each process ran only its share of the images
    # the calls are not degenerate: different seeds and images differ
    assert np.abs(single["ddpm_per_image"][0] - single["ddpm_per_image"][3]).max() > 1e-2


def test_shares_are_contiguous_and_cover_the_batch():
    for n in range(0, 9):
        for count in (1, 2, 3, 4):
            parts = [process_share(n, r, count) for r in range(count)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 2\)"):
        process_share(4, 2, 2)
    with pytest.raises(ValueError, match="count must be a positive int"):
        process_share(4, 0, 0)


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.initialize()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.split_between_processes([1, 2, 3]) == [1, 2, 3]
    rows = np.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(rows) is rows


def test_incomplete_torchrun_environment_and_bad_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.initialize("mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun's environment is incomplete"):
        distributed.initialize()


def test_enable_distributed_is_checked(folders):
    pipe = DiffusionPipeline.from_pretrained(folders[0])
    assert pipe.enable_distributed() is pipe and pipe.distributed
    with pytest.raises(ValueError, match="enabled must be a bool"):
        pipe.enable_distributed("yes")
    pipe.set_progress_bar_config(disable=True)
    # one process: the call runs whole, as without enable_distributed
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    kwargs = dict(batch_size=2, num_inference_steps=2, output_type="np", class_labels=[0, 1])
    enabled = pipe(generator=gens, **kwargs).images
    pipe.enable_distributed(False)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    np.testing.assert_array_equal(enabled, pipe(generator=gens, **kwargs).images)


def test_pipelines_that_do_not_split_refuse():
    from diffusion_core.torch.pipelines.unclip import UnCLIPPipeline

    class Stub(UnCLIPPipeline):
        _components = ()

    with pytest.raises(ValueError, match="enable_distributed: Stub does not split over processes"):
        Stub().enable_distributed()


def test_noise_is_drawn_on_the_generators_device_then_moved(monkeypatch):
    """``pipe.to("cuda")``: the start and step noise come from CPU generators, then move (every device, same draw)."""
    from diffusion_core.torch.sampling import randn_tensor

    drawn, real = [], torch.randn

    def spy(*args, **kwargs):
        drawn.append(torch.device(kwargs["device"]).type)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    for generator in ([torch.Generator().manual_seed(i) for i in range(2)], torch.Generator().manual_seed(0), None):
        out = randn_tensor((2, 3), generator, device="meta")  # meta: a device other than the generator's
        assert out.device.type == "meta"
    assert drawn == ["cpu"] * 4  # two per-image draws, one batch draw, one default-generator draw
