"""The opt-in NaN/inf check: off by default; on, a broken UNet or VAE is a FloatingPointError naming the
stage and the likely cause, on both backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
from diffusion_core.torch import DiffusionPipeline as TorchPipeline
from tests.pipelines import sd_tiny

CALL = dict(num_inference_steps=2, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


def _torch_pipe(folder):
    pipe = TorchPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_torch_overflowing_vae_names_force_upcast(sd_folder):
    pipe = _torch_pipe(sd_folder)
    pipe.enable_finite_check()
    pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL)  # healthy: no error
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"NaN or inf in the VAE's decoded images \(images \[0\] of 1\).*"
                       "force_upcast"):  # fmt: skip
        pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL)
    pipe.enable_finite_check(False)  # off (the default): the call returns, as diffusers would
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.asarray(images).shape == (1, 32, 32, 3)


def test_torch_broken_unet_names_the_latents(sd_folder):
    pipe = _torch_pipe(sd_folder)
    pipe.enable_finite_check(True)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf in the denoised latents .*float32"):
        pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        pipe.enable_finite_check("yes")


def test_flax_overflowing_vae_names_force_upcast(sd_folder):
    pipe = FlaxPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_finite_check()
    bias = pipe.vae.decoder.conv_out.bias
    bias[...] = jnp.full_like(bias[...], jnp.inf)
    with pytest.raises(FloatingPointError, match="NaN or inf in the VAE's decoded images.*force_upcast"):
        pipe("a cat", key=jax.random.key(0), **CALL)
