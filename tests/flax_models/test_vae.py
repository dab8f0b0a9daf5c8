"""Flax AutoencoderKL parity with diffusers through the one converter, eager and under jax.jit."""

from __future__ import annotations

from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_core.flax.models import AutoencoderKL, flax_state_to_torch, load_torch_state_dict, weight_shapes
from diffusion_core.models.autoencoder import DiagonalGaussianDistribution
from tests.torch_models.test_vae import BASE, CASES

REL_TOL = 1e-4


def _build(name: str) -> tuple[torch.nn.Module, AutoencoderKL]:
    """diffusers reference with random weights, and ours built abstractly then loaded from its state dict."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CASES[name]).eval()
    ours = nnx.eval_shape(lambda: AutoencoderKL(**CASES[name], rngs=nnx.Rngs(0), dtype=jnp.float32))
    load_torch_state_dict(ours, ref.state_dict())
    ours.eval()
    return ref, ours


def _rel_l2(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _image(name: str, batch: int = 2, height: int | None = None, width: int | None = None) -> np.ndarray:
    cfg = CASES[name]
    size = cfg["sample_size"]
    shape = (batch, cfg.get("in_channels", 3), height or size, width or size)
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def _latent(height: int, width: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((batch, 4, height, width)).astype(np.float32)


def _assert_round_trip(ref: torch.nn.Module, ours: AutoencoderKL) -> None:
    """diffusers -> flax -> torch through the same converter gives the state dict back, bit for bit."""
    back = flax_state_to_torch(ours)
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def _ref_run(fn: Any, *args: np.ndarray) -> Any:
    with torch.no_grad():
        return fn(*(torch.from_numpy(a) for a in args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_encode_decode_forward_parity(name: str) -> None:
    ref, ours = _build(name)
    x = _image(name)
    ref_post = _ref_run(ref.encode, x).latent_dist
    post = ours.encode(x)
    for attr in ("mean", "std", "var", "logvar"):
        assert _rel_l2(getattr(post, attr), getattr(ref_post, attr)) <= REL_TOL, attr
    assert _rel_l2(post.mode(), ref_post.mode()) <= REL_TOL
    z = np.asarray(post.mean)
    assert _rel_l2(ours.decode(z), _ref_run(ref.decode, z).sample) <= REL_TOL
    assert _rel_l2(ours(x), _ref_run(ref, x).sample) <= REL_TOL
    # diffusers draws the posterior noise from a generator; we pass the same draw explicitly.
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3)).numpy()
    assert _rel_l2(ours(x, sample_posterior=True, noise=noise), expected) <= REL_TOL
    _assert_round_trip(ref, ours)


def test_parity_under_jit() -> None:
    ref, ours = _build("three_level_no_quant")
    x = _image("three_level_no_quant")
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state: nnx.State, x: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        return model.encode(x).parameters, model(x, sample_posterior=True, noise=noise)

    with torch.no_grad():
        expected_moments = ref.encode(torch.from_numpy(x)).latent_dist.parameters
        expected = ref(torch.from_numpy(x), sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
    moments, got = run(state, x, noise)
    assert _rel_l2(moments, expected_moments) <= REL_TOL
    assert _rel_l2(got, expected) <= REL_TOL


def test_tiled_sliced_match_diffusers() -> None:
    """Tiling and slicing together (batch-1 tiles); few distinct tile shapes keep eager compiles cheap."""
    ref, ours = _build("two_level")
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (
        ref.tile_sample_min_size,
        ref.tile_latent_min_size,
        ref.tile_overlap_factor,
    )
    for model in (ref, ours):
        model.tile_latent_min_size, model.tile_sample_min_size = 4, 8  # factor 2
        model.enable_tiling()
        model.enable_slicing()
    z = _latent(3, 7)  # one row of three blended 4-wide latent tiles, the last ragged
    expected = _ref_run(ref.decode, z).sample
    assert _rel_l2(ours.decode(z), expected) <= REL_TOL
    assert _rel_l2(ours.tiled_decode(z[:1]), expected[:1]) <= REL_TOL
    x = _image("two_level", height=6, width=14)  # one row of three 8-wide pixel tiles
    expected_moments = _ref_run(ref.encode, x).latent_dist.parameters
    assert _rel_l2(ours.encode(x).parameters, expected_moments) <= REL_TOL
    assert _rel_l2(ours.tiled_encode(x[:1]).parameters, expected_moments[:1]) <= REL_TOL
    ours.disable_tiling()
    ours.disable_slicing()
    assert not ours.use_slicing and not ours.use_tiling


def test_parameter_paths_and_from_config() -> None:
    ref, ours = _build("two_level")
    shapes = weight_shapes(ours)
    assert shapes[("encoder", "down_blocks", 0, "downsamplers", 0, "conv", "kernel")] == (3, 3, 4, 4)
    assert shapes[("decoder", "mid_block", "attentions", 0, "to_out", 0, "kernel")] == (8, 8)
    assert shapes[("quant_conv", "kernel")] == (1, 1, 8, 8)
    assert set(ours.config) == {k for k in ref.config if not k.startswith("_")}
    config = {**CASES["no_mid_attn_no_post_quant"], "_class_name": "AutoencoderKL"}
    model = nnx.eval_shape(lambda: AutoencoderKL.from_config(config, dtype=jnp.float32))
    assert model.config["latents_std"] == (1.0, 2.0, 0.5, 1.5)
    assert model.post_quant_conv is None and model.decoder.mid_block.attentions[0] is None


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}, "down_block_types"),
        ({"up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}, "up_block_types"),
        ({"block_out_channels": (4, 8, 8)}, "block_out_channels"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"act_fn": "tanh"}, "act_fn"),
        ({"layers_per_block": 0}, "layers_per_block"),
    ],
)
def test_bad_config_raises(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: AutoencoderKL(**{**BASE, **overrides}))


def test_bad_inputs_raise() -> None:
    model = nnx.eval_shape(lambda: AutoencoderKL(**BASE))  # inputs are checked before any weight is used
    x = _image("two_level")
    with pytest.raises(ValueError, match="^x:"):
        model.encode(x[:, :2])
    with pytest.raises(ValueError, match="^z:"):
        model.decode(jnp.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="^noise:"):
        model(x, sample_posterior=True)
    with pytest.raises(ValueError, match="^noise:"):
        model(x, noise=jnp.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="^parameters:"):
        DiagonalGaussianDistribution(jnp.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="^config:"):
        AutoencoderKL.from_config([("block_out_channels", (4, 8))])
    model.enable_tiling()
    model.tile_overlap_factor = 1.0
    with pytest.raises(ValueError, match="^tile_overlap_factor:"):
        model.decode(jnp.zeros((1, 4, 16, 16)))
