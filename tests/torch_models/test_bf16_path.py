"""The torch bfloat16 path (issue 10 §2b): what a bf16 UNet forward dispatches, against diffusers on the same config.

Speed on a shared CPU is measured in ``benchmarks/models.py``; these tests pin its load-independent half
(``benchmarks/op_census.py``): every convolution, matmul and attention of an SD-1.5-style bf16 forward runs
in bfloat16, the op mix is diffusers', and there are no more dtype casts or layout copies than diffusers
makes. ``upcast_attention`` (SD 2.x) is the documented exception: attention then runs in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.op_census import Census, op_census
from tests.torch_models.test_unet_2d_condition import BF16_TOL, CASES, _build, _rel_l2

# SD-1.5's block layout (three attention levels, conv proj_in/proj_out, GEGLU) at test size.
SD15_SMALL: dict[str, Any] = {
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


def _bf16_census(config: dict[str, Any]) -> tuple[Census, Census, torch.Tensor, torch.Tensor]:
    """Op census of diffusers' and our bf16 forward on the same weights and inputs, with both outputs."""
    ref, ours = _build(config)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.get("in_channels", 4), 16, 16, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 7, config["cross_attention_dim"], generator=g).to(torch.bfloat16)
    t = torch.tensor([500])
    ref_census, ours_census = op_census(ref, x, t, ctx), op_census(ours, x, t, ctx)
    with torch.inference_mode():
        return ref_census, ours_census, ref(x, t, ctx).sample, ours(x, t, ctx)


@pytest.fixture(scope="module")
def sd15_bf16() -> tuple[Census, Census, torch.Tensor, torch.Tensor]:
    return _bf16_census(SD15_SMALL)


def test_sd15_bf16_matches_diffusers(sd15_bf16) -> None:
    _, _, expected, got = sd15_bf16
    assert got.dtype == torch.bfloat16
    assert _rel_l2(got, expected) <= BF16_TOL


def test_sd15_bf16_runs_every_heavy_op_in_bfloat16_as_diffusers(sd15_bf16) -> None:
    ref, ours, _, _ = sd15_bf16
    kinds = {kind for kind, _ in ours.heavy}
    assert {"conv", "matmul", "attention"} <= kinds, ours.heavy
    assert ours.heavy_in(torch.float32) == 0, ours.heavy
    assert ours.heavy == ref.heavy  # same convolutions, matmuls and fused attention calls, same dtypes


def test_sd15_bf16_casts_and_copies_no_more_than_diffusers(sd15_bf16) -> None:
    ref, ours, _, _ = sd15_bf16
    assert ours.casts <= ref.casts, (ours.casts, ref.casts)
    assert ours.cast_mib <= ref.cast_mib
    assert ours.copies <= ref.copies, (ours.copies, ref.copies)
    assert ours.copy_mib <= ref.copy_mib


def test_upcast_attention_runs_attention_in_float32_and_the_rest_in_bf16() -> None:
    config = CASES["sd2_tiny"]
    assert config["upcast_attention"]
    _, ours, expected, got = _bf16_census({**config, "in_channels": 4})
    attention = {dtype: n for (kind, dtype), n in ours.heavy.items() if kind == "attention"}
    assert attention and set(attention) == {"float32"}, ours.heavy
    assert ours.heavy_in(torch.float32) == sum(attention.values())  # convs and matmuls stay bf16
    assert got.dtype == torch.bfloat16
    assert _rel_l2(got, expected) <= BF16_TOL


def test_census_counts_casts_copies_and_heavy_ops() -> None:
    """The census itself: a float32 linear after a cast, a transposed copy, a bf16 conv."""

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.nn.functional.linear(x.float(), torch.ones(3, 4))  # one cast, one float32 matmul
            z = y.t().contiguous()  # one copy of 3 x 2 float32
            w = torch.nn.functional.conv2d(x.reshape(1, 1, 2, 4), torch.ones(1, 1, 1, 1, dtype=x.dtype))
            return z, w

    census = op_census(Probe(), torch.ones(2, 4, dtype=torch.bfloat16))
    assert census.casts == 1 and census.cast_mib == pytest.approx(2 * 4 * 4 / 2**20)
    assert census.heavy == {("matmul", "float32"): 1, ("conv", "bfloat16"): 1}
    assert census.heavy_in(torch.float32) == 1 and census.heavy_in(torch.bfloat16) == 1
    assert census.copies == 1 and census.copy_mib == pytest.approx(3 * 2 * 4 / 2**20)
