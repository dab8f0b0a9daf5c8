"""Flax UNet2DModel parity with diffusers through the one converter, eager and under jax.jit."""

from __future__ import annotations

from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_core.flax.models import UNet2DModel, flax_state_to_torch, load_torch_state_dict, weight_shapes
from tests.torch_models.test_unet_2d import BASE, CASES

REL_TOL = 1e-4
# Compiled parity on the cases that exercise distinct code paths (each jit compile costs seconds on
# CPU); "learned_time" runs eagerly below and "ddpm_fast" is covered by "class_embeds" plus eager.
JIT_CASES = (
    "class_embeds",
    "fourier",
    "head_dim_no_mid_attn",
    "resnet_resample_head_none",
    "scale_shift",
    "timestep_class_no_mid",
)


def _build(overrides: dict[str, Any]) -> tuple[torch.nn.Module, UNet2DModel]:
    """diffusers reference with random weights, and our model filled from its state dict.

    Ours is built abstractly (``nnx.eval_shape``: no initializer runs) and loaded concretely.
    """
    config = {**BASE, **overrides}
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**config).eval()
    ours = nnx.eval_shape(lambda: UNet2DModel(**config, rngs=nnx.Rngs(0), dtype=jnp.float32))
    load_torch_state_dict(ours, ref.state_dict())
    ours.eval()
    return ref, ours


def _assert_round_trip(ref: torch.nn.Module, ours: UNet2DModel) -> None:
    """diffusers -> flax -> torch through the same converter gives the state dict back, bit for bit."""
    back = flax_state_to_torch(ours)
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def _rel_l2(a: Any, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _reference(ref: torch.nn.Module, sample: np.ndarray, t: Any, labels: np.ndarray | None) -> np.ndarray:
    y = None if labels is None else torch.from_numpy(labels)
    with torch.no_grad():
        return ref(torch.from_numpy(sample), torch.as_tensor(t), class_labels=y).sample.numpy()


def _inputs(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sample, per-batch timesteps valid for the case (fourier takes positive sigmas), labels."""
    sample = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    steps = np.array([0.05, 3.0], np.float32) if name == "fourier" else np.array([3, 517])
    conditional = "num_class_embeds" in CASES[name] or "class_embed_type" in CASES[name]
    return sample, steps, np.array([3, 7]) if conditional else None


@pytest.mark.parametrize("name", JIT_CASES)
def test_parity_under_jit(name: str) -> None:
    ref, ours = _build(CASES[name])
    sample, steps, labels = _inputs(name)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state: nnx.State, x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
        return nnx.merge(graphdef, state)(x, t, y)

    expected = _reference(ref, sample, steps, labels)
    got = run(state, sample, steps, labels)
    assert got.shape == expected.shape
    assert _rel_l2(got, expected) <= REL_TOL
    _assert_round_trip(ref, ours)


def test_parity_eager_timestep_forms() -> None:
    ref, ours = _build(CASES["learned_time"])
    sample, steps, labels = _inputs("learned_time")
    for t in (steps, steps[1], int(steps[1])):  # (B,), 0-d and Python int timesteps
        assert _rel_l2(ours(sample, t, labels), _reference(ref, sample, t, labels)) <= REL_TOL, t
    _assert_round_trip(ref, ours)


def test_state_dict_round_trip_bit_exact() -> None:
    """The one case without a forward test above; the others check the round trip there."""
    _assert_round_trip(*_build(CASES["ddpm_fast"]))


def test_parameter_paths_mirror_diffusers() -> None:
    _, ours = _build(CASES["scale_shift"])
    shapes = weight_shapes(ours)
    assert shapes[("down_blocks", 0, "resnets", 1, "conv1", "kernel")] == (3, 3, 4, 4)
    assert shapes[("up_blocks", 0, "attentions", 0, "to_out", 0, "kernel")] == (8, 8)
    assert shapes[("conv_norm_out", "scale")] == (4,)


def test_load_is_strict_and_atomic() -> None:
    ref, ours = _build({})
    before = flax_state_to_torch(ours)
    state = {k: v.numpy() * 0 for k, v in ref.state_dict().items()}
    state.pop("conv_out.bias")
    with pytest.raises(ValueError, match=r"missing \(1\): \['conv_out.bias'\]"):
        load_torch_state_dict(ours, state)
    state["conv_out.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torch_state_dict(ours, state)
    after = flax_state_to_torch(ours)
    assert all(np.array_equal(after[k], before[k]) for k in before)  # untouched on failure


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("down_block_types", ("SkipDownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", ("AttnSkipUpBlock2D", "UpBlock2D")),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("time_embedding_type", "sinusoidal"),
        ("resnet_time_scale_shift", "spatial"),
        ("class_embed_type", "projection"),
        ("downsample_type", "fir"),
        ("act_fn", "tanh"),
    ],
)
def test_unsupported_options_raise(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        nnx.eval_shape(lambda: UNet2DModel(**{**BASE, option: value}))


def test_bad_inputs_raise() -> None:
    model = nnx.eval_shape(lambda: UNet2DModel(**BASE))  # inputs are checked before any weight is used
    sample = jnp.zeros((2, 3, 8, 8))
    with pytest.raises(ValueError, match="timestep"):
        model(sample, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        model(sample, 1, class_labels=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="sample"):
        model(sample[0], 1)
    with pytest.raises(ValueError, match="block_out_channels"):
        nnx.eval_shape(lambda: UNet2DModel(**{**BASE, "block_out_channels": (4, 8, 8)}))


def test_from_config_ignores_private_keys() -> None:
    config = {**BASE, "_class_name": "UNet2DModel", "num_class_embeds": 10}
    model = nnx.eval_shape(lambda: UNet2DModel.from_config(config, dtype=jnp.float32))
    assert model.config["num_class_embeds"] == 10
    assert weight_shapes(model)[("class_embedding", "embedding")] == (10, 16)
