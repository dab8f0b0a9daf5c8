"""flax.compat models: ``apply({"params": p}, ...)`` equals the native NNX call; save/load round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_core.flax import compat, models
from tests.pipelines import sd_tiny

RNG = np.random.default_rng(0)
LATENTS = jnp.asarray(RNG.standard_normal((2, 4, 8, 8)), dtype=jnp.float32)
TEXT = jnp.asarray(RNG.standard_normal((2, 5, 8)), dtype=jnp.float32)
IMAGE = jnp.asarray(RNG.uniform(-1, 1, (2, 3, 16, 16)), dtype=jnp.float32)


def native_and_compat(native_cls, compat_cls, config):
    native = native_cls.from_config(config, rngs=nnx.Rngs(3))
    model, params = compat_cls.from_native(native)
    return native, model, params


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_unet_apply_equals_native_and_round_trips(tmp_path):
    config = {**sd_tiny.SD_UNET, "in_channels": 4}
    native, unet, params = native_and_compat(models.UNet2DConditionModel, compat.FlaxUNet2DConditionModel, config)
    out = unet.apply({"params": params}, LATENTS, jnp.asarray([10, 500]), TEXT)
    close(out.sample, native(LATENTS, jnp.asarray([10, 500]), TEXT))
    jitted = jax.jit(lambda p, x: unet.apply({"params": p}, x, 10, TEXT).sample)(params, LATENTS)
    close(jitted, native(LATENTS, 10, TEXT), 1e-4)
    unet.save_pretrained(tmp_path / "unet", params=params)
    again, loaded = compat.FlaxUNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    close(again.apply({"params": loaded}, LATENTS, 10, TEXT).sample, native(LATENTS, 10, TEXT))


def test_unet_init_weights_gives_fresh_params_of_the_same_tree():
    config = {**sd_tiny.SD_UNET, "in_channels": 4}
    _, unet, params = native_and_compat(models.UNet2DConditionModel, compat.FlaxUNet2DConditionModel, config)
    fresh = unet.init_weights(jax.random.key(7))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    assert unet.apply({"params": fresh}, LATENTS, 10, TEXT).sample.shape == LATENTS.shape
    with pytest.raises(ValueError, match="variables"):
        unet.apply(params, LATENTS, 10, TEXT)
    with pytest.raises(ValueError, match="params"):
        unet(LATENTS, 10, TEXT)


def test_vae_encode_decode_equal_native():
    native, vae, params = native_and_compat(models.AutoencoderKL, compat.FlaxAutoencoderKL, sd_tiny.SD_VAE)
    dist = vae.apply({"params": params}, IMAGE, method=vae.encode).latent_dist
    posterior = native.encode(IMAGE)
    close(dist.mean, jnp.transpose(posterior.mean, (0, 2, 3, 1)))  # 0.39's latent_dist is channels-last
    key = jax.random.key(1)
    drawn = dist.sample(key)
    close(
        drawn,
        jnp.transpose(
            posterior.sample(jnp.transpose(jax.random.normal(key, dist.mean.shape), (0, 3, 1, 2))), (0, 2, 3, 1)
        ),
    )
    latents = jnp.transpose(drawn, (0, 3, 1, 2))
    image = vae.apply({"params": params}, latents, method=vae.decode).sample
    close(image, native.decode(latents))
    close(vae.apply({"params": params}, drawn, method="decode").sample, image)  # channels-last latents too


def test_controlnet_apply_equals_native():
    native, cn, params = native_and_compat(models.ControlNetModel, compat.FlaxControlNetModel, sd_tiny.SD_CONTROLNET)
    cond = jnp.asarray(RNG.uniform(0, 1, (2, 3, 16, 16)), dtype=jnp.float32)
    out = cn.apply({"params": params}, LATENTS, 10, TEXT, cond, conditioning_scale=0.5)
    down, mid = native(LATENTS, 10, TEXT, cond, conditioning_scale=0.5)
    assert len(out.down_block_res_samples) == len(down)
    for a, b in zip(out.down_block_res_samples, down, strict=True):
        close(a, b)
    close(out.mid_block_res_sample, mid)


def test_clip_text_call_with_params_equals_native(tmp_path):
    native, clip, params = native_and_compat(models.CLIPTextModel, compat.FlaxCLIPTextModel, sd_tiny.SD_TEXT)
    ids = jnp.asarray([[49406, 320, 1125, 49407, 49407]])
    close(clip(ids, params=params)[0], native(ids).last_hidden_state)
    close(clip.apply({"params": params}, ids).pooler_output, native(ids).pooler_output)
    clip.save_pretrained(tmp_path / "te", params=params)
    held = compat.FlaxCLIPTextModel.from_pretrained(tmp_path / "te")
    close(held(ids)[0], native(ids).last_hidden_state)
    model, loaded = compat.FlaxCLIPTextModel.from_pretrained(tmp_path / "te", _do_init=False)
    close(model(ids, params=loaded)[0], native(ids).last_hidden_state)
