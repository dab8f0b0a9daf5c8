"""Trainers end to end: the loss falls, the output folder loads everywhere, a killed run resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from diffusion_core import training
from diffusion_core.training.checkpoint import read_state
from tests.training import tiny
from tests.training.harness import CONFIG as HARNESS_CONFIG
from tests.training.harness import make_trainer

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
BACKENDS = ["torch", pytest.param("flax", marks=pytest.mark.slow)]  # flax: jit compiles take minutes here


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_decreases_and_output_folder_is_a_pipeline(backend, tmp_path):
    losses = make_trainer(backend).fit(tiny.dataset(), 40, tmp_path, progress=False)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:4])
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "loss.csv").is_file()
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 41
    assert training.checkpoint_steps(tmp_path) == [40]


def test_output_folder_loads_in_diffusers_and_both_backends(tmp_path):
    import torch
    from diffusers import DDPMPipeline as RefPipeline

    from diffusion_core.flax import DDPMPipeline as FlaxPipeline
    from diffusion_core.torch import DDPMPipeline as TorchPipeline

    make_trainer("torch").fit(tiny.dataset(), 2, tmp_path, progress=False)
    ref = RefPipeline.from_pretrained(tmp_path)
    ours = TorchPipeline.from_pretrained(tmp_path)
    flax_pipe = FlaxPipeline.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([3, 50]), torch.tensor([0, 2])
    with torch.no_grad():
        expected = ref.unet(x, t, class_labels=y).sample.numpy()
        got = ours.unet(x, t, class_labels=y).numpy()
    flax_out = np.asarray(flax_pipe.unet(x.numpy(), t.numpy(), class_labels=y.numpy()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flax_out, expected, rtol=1e-4, atol=1e-4)
    images = ours(
        batch_size=2,
        num_inference_steps=2,
        output_type="np",
        class_labels=[0, 1],
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 8, 8, 1)


def _run(backend: str, out: Path, steps: int, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.training.run_tiny", backend, str(out), str(steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=env)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_then_resume_equals_an_uninterrupted_run(backend, tmp_path):
    steps = 8
    make_trainer(backend).fit(tiny.dataset(), steps, tmp_path / "straight", checkpoint_every=2, progress=False)
    out = tmp_path / "killed"
    proc = _run(backend, out, steps)
    deadline = time.monotonic() + 300
    while not training.checkpoint_steps(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = training.checkpoint_steps(out)
    assert killed_at and killed_at[-1] < steps, "the run was not killed mid-way"
    make_trainer(backend).fit(tiny.dataset(), steps, out, checkpoint_every=2, resume=True, progress=False)
    for name in (WEIGHTS, f"checkpoints/checkpoint-{steps}/unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows == (tmp_path / "straight" / "loss.csv").read_text().splitlines()


def test_bf16_autocast_and_accumulation_run_and_stay_close_to_float32():
    import dataclasses

    from tests.training.harness import CONFIG

    batch = training.step_batch(tiny.dataset(), 0, 6, 0, 100)
    losses = {}
    for name, cfg in {
        "fp32": CONFIG,
        "bf16": dataclasses.replace(CONFIG, mixed_precision="bf16"),
        "accum": dataclasses.replace(CONFIG, gradient_accumulation_steps=3),
    }.items():
        losses[name] = make_trainer("torch", cfg).train_step(batch, 1e-3, 0.0)
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
    assert abs(losses["accum"] - losses["fp32"]) < 1e-5 * losses["fp32"]  # same batch, mean of equal parts


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_twenty_kills_at_random_moments_then_resume_equals_an_uninterrupted_run(backend, tmp_path):
    """Checkpoints every step, SIGKILL 20 times at random moments (mid-step, mid-checkpoint, mid-export):
    the newest checkpoint always reads, the final weights equal an uninterrupted run's, no temporaries stay."""
    steps, rng = 12, np.random.default_rng(0)
    window = (2.0, 6.0) if backend == "torch" else (12.0, 40.0)  # past the imports (and flax's compile)
    make_trainer(backend).fit(tiny.dataset(), steps, tmp_path / "straight", checkpoint_every=1, progress=False)
    out = tmp_path / "killed"
    for _ in range(20):
        proc = _run(backend, out, steps, resume=True)
        time.sleep(float(rng.uniform(*window)))  # into the steps, checkpoint writes and export
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = training.latest_checkpoint(out)
        if latest is not None:
            assert read_state(latest)["step"] == int(latest.name.split("-")[1])  # complete
    make_trainer(backend).fit(tiny.dataset(), steps, out, checkpoint_every=1, resume=True, progress=False)
    a, b = load_file(str(tmp_path / "straight" / WEIGHTS)), load_file(str(out / WEIGHTS))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("accum", [1, 3])
def test_flax_accumulation_is_straight_line_code(accum):
    """XLA:CPU runs convolutions inside a while loop ~30x slower: the step's gradients must not loop."""
    import jax
    import jax.numpy as jnp

    from diffusion_core.flax.training import accumulated_value_and_grad

    def loss_fn(w, x, labels):  # (O, I, kh, kw) conv of (B, I, H, W)
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
        return jnp.mean(y**2) + 0.0 * jnp.sum(labels)

    w, x = jnp.ones((2, 1, 3, 3)), jnp.arange(6 * 16, dtype=jnp.float32).reshape(6, 1, 4, 4) / 96
    labels = jnp.arange(6)
    jaxpr = str(jax.make_jaxpr(lambda w: accumulated_value_and_grad(loss_fn, w, (x, labels), accum))(w))
    assert "while" not in jaxpr and "scan" not in jaxpr and "conv_general_dilated" in jaxpr
    loss, grads = accumulated_value_and_grad(loss_fn, w, (x, labels), accum)
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(w, x, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)


@pytest.mark.slow  # two flax compiles
def test_flax_accumulation_equals_one_batch():
    import dataclasses

    batch = training.step_batch(tiny.dataset(), 0, 6, 0, 100)
    one = make_trainer("flax").train_step(batch, 1e-3, 0.0)
    three = make_trainer("flax", dataclasses.replace(HARNESS_CONFIG, gradient_accumulation_steps=3))
    assert abs(three.train_step(batch, 1e-3, 0.0) - one) < 1e-5 * one
