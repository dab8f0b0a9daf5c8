"""AutoencoderKL parity with diffusers: same state-dict keys, same outputs on random weights."""

from __future__ import annotations

import json
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core.arrays import namespace
from diffusion_core.configuration import config_to_json_string
from diffusion_core.models.autoencoder import tiled_apply
from diffusion_core.torch.models import AutoencoderKL, DiagonalGaussianDistribution

REL_TOL = 1e-5

CASES: dict[str, dict[str, Any]] = {
    # diffusers' AutoencoderKL fast-test shape: two levels, factor 2.
    "two_level": {
        "block_out_channels": (4, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "norm_num_groups": 2,
        "layers_per_block": 1,
        "sample_size": 16,
    },
    # Three levels (factor 4), two layers per block, no quant_conv (SD3/Flux style).
    "three_level_no_quant": {
        "block_out_channels": (8, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "norm_num_groups": 4,
        "layers_per_block": 2,
        "sample_size": 32,
        "use_quant_conv": False,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
    },
    # No mid-block attention, no post_quant_conv, other channel counts.
    "no_mid_attn_no_post_quant": {
        "in_channels": 1,
        "out_channels": 2,
        "block_out_channels": (4, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "norm_num_groups": 4,
        "layers_per_block": 2,
        "sample_size": 16,
        "mid_block_add_attention": False,
        "use_post_quant_conv": False,
        "latents_mean": (0.1, -0.2, 0.3, 0.0),
        "latents_std": (1.0, 2.0, 0.5, 1.5),
        "force_upcast": False,
    },
}


def _build(name: str) -> tuple[Any, AutoencoderKL]:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CASES[name]).eval()
    ours = AutoencoderKL(**CASES[name]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _image(name: str, batch: int = 2, height: int | None = None, width: int | None = None) -> torch.Tensor:
    cfg = CASES[name]
    size = cfg["sample_size"]
    shape = (batch, cfg.get("in_channels", 3), height or size, width or size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _latent(name: str, height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_encode_decode_forward_parity(name: str) -> None:
    ref, ours = _build(name)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = _image(name)
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        for attr in ("mean", "std", "var", "logvar"):
            assert _rel_l2(getattr(post, attr), getattr(ref_post, attr)) <= REL_TOL, attr
        assert _rel_l2(post.mode(), ref_post.mode()) <= REL_TOL
        assert _rel_l2(post.kl(), ref_post.kl()) <= REL_TOL
        z = post.mean
        assert _rel_l2(ours.decode(z), ref.decode(z).sample) <= REL_TOL
        assert _rel_l2(ours(x), ref(x).sample) <= REL_TOL
        # diffusers draws the posterior noise from the generator; we take the same draw explicitly.
        expected = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        got = ours(x, sample_posterior=True, noise=noise)
    assert _rel_l2(got, expected) <= REL_TOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_sliced_matches_diffusers(name: str) -> None:
    ref, ours = _build(name)
    x = _image(name, batch=3)
    with torch.no_grad():
        whole_moments = ours.encode(x).parameters
        z = _latent(name, 4, 4, batch=3)
        whole = ours.decode(z)
        ref.enable_slicing()
        ours.enable_slicing()
        assert _rel_l2(ours.encode(x).parameters, ref.encode(x).latent_dist.parameters) <= REL_TOL
        sliced = ours.decode(z)
        assert _rel_l2(sliced, ref.decode(z).sample) <= REL_TOL
        assert _rel_l2(ours.encode(x).parameters, whole_moments) <= REL_TOL
    assert _rel_l2(sliced, whole) <= REL_TOL
    ours.disable_slicing()
    assert not ours.use_slicing


def _small_tiles(model: Any, name: str) -> None:
    factor = 2 ** (len(CASES[name]["block_out_channels"]) - 1)
    model.tile_latent_min_size = 4
    model.tile_sample_min_size = 4 * factor
    model.tile_overlap_factor = 0.25


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiled_matches_diffusers(name: str) -> None:
    ref, ours = _build(name)
    factor = 2 ** (len(CASES[name]["block_out_channels"]) - 1)
    # Defaults follow diffusers: a tile is one sample_size image.
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size) == (
        ref.tile_sample_min_size,
        ref.tile_latent_min_size,
    )
    assert ours.tile_overlap_factor == ref.tile_overlap_factor
    for model in (ref, ours):
        _small_tiles(model, name)
        model.enable_tiling()
    z = _latent(name, 9, 7)  # larger than a 4x4 latent tile, ragged edges
    x = _image(name, height=7 * factor + 3, width=9 * factor)  # several tiles, one ragged row
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
        assert _rel_l2(got, expected) <= REL_TOL
        ours.disable_tiling()
        assert _rel_l2(got, ours.decode(z)) > 1e-3  # the tiles really were decoded separately
        ours.enable_tiling()
        assert _rel_l2(ours.tiled_decode(z), expected) <= REL_TOL
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        assert _rel_l2(post.parameters, ref_post.parameters) <= REL_TOL
        ours.enable_slicing()
        ref.enable_slicing()
        assert _rel_l2(ours.decode(z), ref.decode(z).sample) <= REL_TOL
    ours.disable_tiling()
    assert not ours.use_tiling


def test_config_fields_and_from_config() -> None:
    for name in CASES:
        ref, ours = _build(name)
        ref_fields = {k for k in ref.config if not k.startswith("_")}
        assert set(ours.config) == ref_fields
        for key in ref_fields:
            value, mine = ref.config[key], ours.config[key]
            assert (list(value) if isinstance(value, tuple) else value) == (
                list(mine) if isinstance(mine, tuple) else mine
            ), key
    assert ours.config["latents_std"] == (1.0, 2.0, 0.5, 1.5)
    assert ours.config["force_upcast"] is False
    on_disk = json.loads(config_to_json_string({**ref.config, "_class_name": "AutoencoderKL"}))
    clone = AutoencoderKL.from_config(on_disk).eval()
    clone.load_state_dict(ref.state_dict(), strict=True)
    x = _image(name)
    with torch.no_grad():
        assert torch.equal(clone(x), ours(x))


def test_distribution_helpers() -> None:
    params = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    params[:, 4:] = params[:, 4:] * 40  # exercises the log-variance clamp
    ours = DiagonalGaussianDistribution(params)
    ref = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(params)
    other_params = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(5))
    other, ref_other = DiagonalGaussianDistribution(other_params), type(ref)(other_params)
    assert _rel_l2(ours.kl(other), ref.kl(ref_other)) <= REL_TOL
    sample = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    assert _rel_l2(ours.nll(sample), ref.nll(sample)) <= REL_TOL
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(sample), det.mean)
    assert torch.equal(det.kl(), torch.zeros(2))


BASE = CASES["two_level"]


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
        AutoencoderKL(**{**BASE, **overrides})


def test_bad_inputs_raise() -> None:
    model = AutoencoderKL(**BASE).eval()
    x = _image("two_level")
    with pytest.raises(ValueError, match="^x:"):
        model.encode(x[:, :2])
    with pytest.raises(ValueError, match="^z:"):
        model.decode(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="^noise:"):
        model(x, sample_posterior=True)
    with pytest.raises(ValueError, match="^noise:"):
        model(x, noise=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="^noise:"):
        model.encode(x).sample(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="^parameters:"):
        DiagonalGaussianDistribution(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="^config:"):
        AutoencoderKL.from_config([("block_out_channels", (4, 8))])
    model.enable_tiling()
    model.tile_overlap_factor = 1.0
    with pytest.raises(ValueError, match="^tile_overlap_factor:"):
        model.decode(torch.zeros(1, 4, 16, 16))


def _upsample_double(a: Any) -> Any:
    """Stand-in decoder for the tiling test: x -> 2 * x, nearest-upsampled 2x (any array library)."""
    xp = namespace(a)
    return 2.0 * xp.repeat(xp.repeat(a, 2, axis=2), 2, axis=3)  # (B, C, 2H, 2W)


def test_core_math_numpy_torch_jax() -> None:
    """The shared posterior and tiling math give the same numbers on numpy, torch and jax."""
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(7)
    params = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    image = rng.standard_normal((1, 2, 11, 9)).astype(np.float32)
    results = {}
    for name, to in (("numpy", np.asarray), ("torch", torch.from_numpy), ("jax", jnp.asarray)):
        post = DiagonalGaussianDistribution(to(params))
        outputs = (post.sample(to(noise)), post.kl(), post.std, tiled_apply(to(image), _upsample_double, 4, 8, 0.25))
        results[name] = [np.asarray(out) for out in outputs]
    for name in ("torch", "jax"):
        for got, expected in zip(results[name], results["numpy"], strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Tiling a pointwise-then-upsample map reproduces it away from the crop (blend of equal values).
    whole = _upsample_double(image)
    stitched = results["numpy"][3]
    np.testing.assert_allclose(stitched, whole[:, :, : stitched.shape[2], : stitched.shape[3]], rtol=1e-6)
