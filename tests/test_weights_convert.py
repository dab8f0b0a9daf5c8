"""The one weight converter (each rule, both directions, strictness) and the shared timestep embedding."""

from __future__ import annotations

import math

import diffusers.models.embeddings as diffusers_embeddings
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.models import timestep_embedding
from diffusion_core.weights.convert import (
    RULES,
    flax_to_torch,
    key_to_path,
    match_flax_path,
    match_torch_key,
    path_to_key,
    torch_to_flax,
)

RNG = np.random.default_rng(0)

# One leaf of each kind: torch key, torch shape, flax path, flax shape, flax array from the torch one.
LEAVES = [
    (
        "down_blocks.0.resnets.1.conv1.weight",
        (8, 4, 3, 3),
        ("down_blocks", 0, "resnets", 1, "conv1", "kernel"),
        (3, 3, 4, 8),
    ),
    ("mid_block.attentions.0.to_out.0.weight", (6, 5), ("mid_block", "attentions", 0, "to_out", 0, "kernel"), (5, 6)),
    ("conv_norm_out.weight", (4,), ("conv_norm_out", "scale"), (4,)),
    ("class_embedding.weight", (10, 16), ("class_embedding", "embedding"), (10, 16)),
    ("conv_norm_out.bias", (4,), ("conv_norm_out", "bias"), (4,)),
    ("time_proj.weight", (7,), ("time_proj", "weight"), (7,)),
]


def _torch_items() -> dict[str, np.ndarray]:
    return {key: RNG.standard_normal(shape).astype(np.float32) for key, shape, _, _ in LEAVES}


def _target() -> dict[tuple, tuple[int, ...]]:
    return {path: shape for _, _, path, shape in LEAVES}


def test_key_path_round_trip() -> None:
    key = "up_blocks.2.attentions.10.to_out.0.bias"
    assert key_to_path(key) == ("up_blocks", 2, "attentions", 10, "to_out", 0, "bias")
    assert path_to_key(key_to_path(key)) == key


def test_each_rule_layout_and_inverse() -> None:
    items = _torch_items()
    flax = dict(torch_to_flax(items.items(), _target()))
    conv_key, lin_key = LEAVES[0][0], LEAVES[1][0]
    np.testing.assert_array_equal(flax[LEAVES[0][2]], items[conv_key].transpose(2, 3, 1, 0))  # OIHW -> HWIO
    np.testing.assert_array_equal(flax[LEAVES[1][2]], items[lin_key].T)  # (out, in) -> (in, out)
    for key, _, path, shape in LEAVES[2:]:
        np.testing.assert_array_equal(flax[path], items[key])  # scale / embedding / bias / frozen weight
        assert flax[path].shape == shape
    back = dict(flax_to_torch(flax.items()))
    assert set(back) == set(items)
    for key, value in items.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)


def test_rule_chosen_by_target_leaf() -> None:
    assert match_torch_key("a.weight", {("a", "kernel"): (3, 3, 1, 2)})[1] is RULES[0]
    assert match_torch_key("a.weight", {("a", "kernel"): (1, 2)})[1] is RULES[1]
    assert match_torch_key("a.weight", {("a", "scale"): (2,)})[1].flax_name == "scale"
    assert match_torch_key("a.weight", {("a", "embedding"): (3, 2)})[1].flax_name == "embedding"
    assert match_torch_key("a.weight", {("a", "kernel"): (1, 2, 3)}) is None  # no rank-3 kernel rule
    assert match_flax_path(("a", "kernel"), 4) == ("a.weight", RULES[0])
    assert match_flax_path(("a", "rngs", "key"), 0) is None
    # bare parameters (PriorTransformer's clip statistics) keep their name and layout, only where listed
    assert match_torch_key("clip_std", {("clip_std",): (1, 4)})[0] == ("clip_std",)
    assert match_torch_key("other", {("other",): (1, 4)}) is None


def test_streaming_yields_one_at_a_time() -> None:
    items = _torch_items()
    stream = torch_to_flax(iter(items.items()), _target())
    path, array = next(stream)
    assert path == LEAVES[0][2] and array.shape == LEAVES[0][3]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update({"conv_out.running_mean": np.zeros(3, np.float32)}), "unmatched"),
        (lambda d: d.pop("conv_norm_out.bias"), "missing"),
        (lambda d: d.update({"conv_norm_out.bias": np.zeros(5, np.float32)}), "shape mismatch"),
    ],
)
def test_torch_to_flax_strict(edit, message: str) -> None:
    items = _torch_items()
    edit(items)
    with pytest.raises(ValueError, match=message):
        list(torch_to_flax(items.items(), _target()))


def test_torch_to_flax_duplicate_is_unexpected() -> None:
    items = list(_torch_items().items())
    with pytest.raises(ValueError, match=r"unexpected \(1\).*given twice"):
        list(torch_to_flax([*items, items[-1]], _target()))


def test_flax_to_torch_strict() -> None:
    flax = dict(torch_to_flax(_torch_items().items(), _target()))
    expected = {key: shape for key, shape, _, _ in LEAVES}
    assert len(dict(flax_to_torch(flax.items(), expected))) == len(LEAVES)
    with pytest.raises(ValueError, match="unmatched"):
        list(flax_to_torch([*flax.items(), (("d", "rngs", "key"), np.zeros(()))]))
    with pytest.raises(ValueError, match="missing"):
        list(flax_to_torch(list(flax.items())[1:], expected))
    with pytest.raises(ValueError, match="unexpected"):
        list(flax_to_torch([*flax.items(), (("extra", "bias"), np.zeros(2))], expected))
    with pytest.raises(ValueError, match="shape mismatch"):
        list(flax_to_torch(flax.items(), {**expected, "conv_norm_out.bias": (5,)}))


def _old_torch_embedding(timesteps, dim, flip_sin_to_cos=False, freq_shift=1.0, scale=1.0, max_period=10000.0):
    """The torch backend's formula before it moved to the core (kept verbatim as the reference)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


@pytest.mark.parametrize(
    ("dim", "flip", "shift", "scale"), [(32, True, 0, 1.0), (9, False, 1, 1.0), (16, False, 1, 3.0)]
)
def test_timestep_embedding_backends_agree(dim: int, flip: bool, shift: float, scale: float) -> None:
    steps = np.array([0, 1, 17, 999], dtype=np.int64)
    reference = _old_torch_embedding(torch.from_numpy(steps), dim, flip, shift, scale)
    oracle = diffusers_embeddings.get_timestep_embedding(torch.from_numpy(steps), dim, flip, shift, scale)
    got_torch = timestep_embedding(torch.from_numpy(steps), dim, flip, shift, scale)
    assert torch.equal(got_torch, reference)
    assert torch.allclose(got_torch, oracle, atol=1e-6)
    got_np = timestep_embedding(steps, dim, flip, shift, scale)
    got_jax = timestep_embedding(jnp.asarray(steps), dim, flip, shift, scale)
    got_jit = jax.jit(lambda t: timestep_embedding(t, dim, flip, shift, scale))(jnp.asarray(steps))
    # float32 sin/cos of an argument x agree across libraries to about ulp(x): exp() may differ by an ulp
    half = dim // 2
    args = scale * steps[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / (half - shift))  # (B, half)
    atol = 1e-6 + 4 * np.finfo(np.float32).eps * np.concatenate([args, args, np.zeros((4, dim % 2))], axis=1)
    for got in (got_np, got_jax, got_jit):
        assert got.shape == (4, dim) and got.dtype == np.float32
        assert np.all(np.abs(np.asarray(got) - reference.numpy()) <= atol)


def test_timestep_embedding_rejects_non_1d() -> None:
    with pytest.raises(ValueError, match="timesteps"):
        timestep_embedding(np.zeros((2, 2)), 8)
