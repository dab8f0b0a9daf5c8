"""Flax UNet2DConditionModel's DeepFloyd IF / unCLIP options vs diffusers 0.42.1 (every parameter random).

The cases are the torch test's (tests/torch_models/test_unet_2d_condition_if.py); the weights go through
the one converter. Under jax.jit for the IF stage I and II configs, eagerly for the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_core.flax.models.loading import load_torch_state_dict
from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel
from tests.flax_models.test_unet_2d_condition import jitted, rel_l2
from tests.torch_models.test_unet_2d_condition_if import CASES, _randomise, if_inputs

REL_TOL = 1e-4


def build(config: dict[str, Any]) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    _randomise(ref, 0)
    ours = nnx.eval_shape(lambda: UNet2DConditionModel(**config))
    load_torch_state_dict(ours, ref.state_dict())
    return ref, ours


def _args(config: dict[str, Any], **extra: Any) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    torch_args = {**if_inputs(config), "timestep": torch.tensor([3, 517]), **extra}
    return {k: v.numpy() for k, v in torch_args.items()}, torch_args


def _reference(ref: torch.nn.Module, torch_args: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return ref(**torch_args).sample.numpy()


@pytest.mark.parametrize("name", ["if_stage_i", "if_stage_ii"])
def test_parity_under_jit(name: str) -> None:
    ref, ours = build(CASES[name])
    args, torch_args = _args(CASES[name])
    assert rel_l2(jitted(ours)(args), _reference(ref, torch_args)) <= REL_TOL


@pytest.mark.parametrize("name", ["if_skip_time_act_three_levels", "only_cross_layer_norm", "unclip_decoder_like"])
def test_parity_eager(name: str) -> None:
    ref, ours = build(CASES[name])
    args, torch_args = _args(CASES[name])
    assert rel_l2(ours(**args), _reference(ref, torch_args)) <= REL_TOL


@pytest.mark.parametrize(
    ("name", "field"), [("if_stage_ii", "encoder_attention_mask"), ("unclip_decoder_like", "attention_mask")]
)
def test_context_masks(name: str, field: str) -> None:
    ref, ours = build(CASES[name])
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    args, torch_args = _args(CASES[name], **{field: mask})
    expected = _reference(ref, torch_args)
    assert rel_l2(ours(**args), expected) <= REL_TOL
    unmasked = ours(**{k: v for k, v in args.items() if k != field})
    assert rel_l2(unmasked, expected) > 1e-4


def test_round_trip_with_diffusers(tmp_path: Path) -> None:
    """diffusers save -> our from_pretrained -> our save_pretrained -> diffusers load: same weights, bit for bit."""
    ref, _ = build(CASES["if_stage_ii"])
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    args, torch_args = _args(CASES["if_stage_ii"])
    assert rel_l2(ours(**args), _reference(ref, torch_args)) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(back[key], value), key
