"""ControlNetModel parity with diffusers 0.42.1, alone and driving UNet2DConditionModel end to end."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core.models.model_config import CONTROLNET_DEFAULTS
from diffusion_core.models.unet_condition_config import controlnet_residual_scales
from diffusion_core.torch.models.controlnet import ControlNetModel
from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel
from tests.torch_models import test_unet_2d_condition as unet_tests

# The oracles (diffusers imports them lazily: pay that at collection, not in the first test).
RefControlNetModel = diffusers.ControlNetModel
RefUNet2DConditionModel = diffusers.UNet2DConditionModel
REL_TOL = 1e-5
BF16_TOL = 2e-2

# diffusers' ControlNet pipeline fast-test models (tests/pipelines/controlnet/test_controlnet.py).
CONTROLNET_TINY: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 2,
    "in_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": 32,
    "conditioning_embedding_out_channels": (16, 32),
    "norm_num_groups": 1,
}
UNET_TINY: dict[str, Any] = {
    **unet_tests.SD1_TINY,
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 1,
}

CASES: dict[str, dict[str, Any]] = {
    "tiny": CONTROLNET_TINY,
    "bgr_pooled_class_embeds": {
        **CONTROLNET_TINY,
        "controlnet_conditioning_channel_order": "bgr",
        "global_pool_conditions": True,
        "num_class_embeds": 10,
        "encoder_hid_dim": 32,  # registered but unused by diffusers' ControlNet forward
    },
    "sd2_style_mid_resnet": {
        **CONTROLNET_TINY,
        "block_out_channels": (8, 16, 16),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "attention_head_dim": (2, 4, 8),
        "use_linear_projection": True,
        "upcast_attention": True,
        "mid_block_type": "UNetMidBlock2D",
        "class_embed_type": "timestep",
        "conditioning_embedding_out_channels": (16, 32, 32),
        "norm_num_groups": 4,
        "transformer_layers_per_block": 2,
    },
    "sdxl_text_time": {  # diffusers' SDXL ControlNet fast-test shape: text_time addition embedding
        **CONTROLNET_TINY,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,
    },
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (a fresh ControlNet's zero convs would hide every error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _build(config: dict[str, Any]) -> tuple[torch.nn.Module, ControlNetModel]:
    torch.manual_seed(0)
    ref = RefControlNetModel(**config).eval()
    _randomise(ref, 0)
    ours = ControlNetModel(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    levels = len(config["conditioning_embedding_out_channels"]) - 1
    kwargs: dict[str, Any] = {
        "sample": torch.randn(2, 4, 8, 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(2, 6, config["cross_attention_dim"], generator=g).to(dtype),
        "controlnet_cond": torch.randn(2, 3, 8 * 2**levels, 8 * 2**levels, generator=g).to(dtype),
    }
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([1, 7])
    elif config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 700])
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = unet_tests.text_time_inputs(config, 2, g)
    return kwargs


def _assert_close(ref_out: Any, ours_out: tuple[tuple[torch.Tensor, ...], torch.Tensor], tol: float) -> None:
    down, mid = ours_out
    assert len(down) == len(ref_out.down_block_res_samples)
    for expected, got in zip(ref_out.down_block_res_samples, down, strict=True):
        assert got.shape == expected.shape
        assert unet_tests._rel_l2(got, expected) <= tol
    assert unet_tests._rel_l2(mid, ref_out.mid_block_res_sample) <= tol


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("guess_mode", [False, True])
def test_parity(name: str, guess_mode: bool) -> None:
    config = CASES[name]
    ref, ours = _build(config)
    assert list(ours.state_dict()) == list(ref.state_dict())
    kwargs = _inputs(config)
    for t in (10, 42.0, torch.tensor(999), torch.tensor([3, 517])):
        with torch.no_grad():
            expected = ref(timestep=t, conditioning_scale=0.7, guess_mode=guess_mode, **kwargs)
            got = ours(timestep=t, conditioning_scale=0.7, guess_mode=guess_mode, **kwargs)
        _assert_close(expected, got, REL_TOL)


def test_controlnet_drives_unet_end_to_end() -> None:
    ref_cn, ours_cn = _build(CONTROLNET_TINY)
    torch.manual_seed(0)
    ref_unet = RefUNet2DConditionModel(**UNET_TINY).eval()
    ours_unet = UNet2DConditionModel(**UNET_TINY).eval()
    ours_unet.load_state_dict(ref_unet.state_dict(), strict=True)
    kwargs = _inputs(CONTROLNET_TINY)
    sample, context = kwargs["sample"], kwargs["encoder_hidden_states"]
    with torch.no_grad():
        ref_res = ref_cn(timestep=33, conditioning_scale=0.5, **kwargs)
        expected = ref_unet(
            sample,
            33,
            context,
            down_block_additional_residuals=ref_res.down_block_res_samples,
            mid_block_additional_residual=ref_res.mid_block_res_sample,
        ).sample
        down, mid = ours_cn(timestep=33, conditioning_scale=0.5, **kwargs)
        got = ours_unet(sample, 33, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours_unet(sample, 33, context)
    assert unet_tests._rel_l2(got, expected) <= REL_TOL
    assert unet_tests._rel_l2(plain, got) > 1e-3


def test_unet_adds_given_residuals() -> None:
    """Any residuals shaped like the skips are added (checked against diffusers), and checked for count."""
    config = unet_tests.CASES["sd2_tiny"]
    ref, ours = unet_tests._build(config)
    kwargs = unet_tests._inputs(config)
    with torch.no_grad():
        down, mid = _fake_residuals(ours, kwargs["sample"])
        expected = ref(
            timestep=5, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample
        got = ours(timestep=5, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)
        plain = ours(timestep=5, **kwargs)
    assert unet_tests._rel_l2(got, expected) <= REL_TOL
    assert unet_tests._rel_l2(plain, got) > 1e-3
    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        ours(timestep=5, down_block_additional_residuals=down, **kwargs)
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        ours(timestep=5, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid, **kwargs)


def _fake_residuals(unet: UNet2DConditionModel, sample: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random residuals shaped like the skips of ``unet`` for ``sample`` (what a ControlNet returns)."""
    g = torch.Generator().manual_seed(3)
    batch, _, h, w = sample.shape
    shapes = [(unet.plan.block_out_channels[0], h, w)]
    for block in unet.plan.down:
        shapes += [(block.out_channels, h, w)] * block.num_layers
        if block.add_downsample:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((block.out_channels, h, w))
    down = [torch.randn(batch, *s, generator=g) for s in shapes]
    return down, torch.randn(batch, unet.plan.block_out_channels[-1], h, w, generator=g)


def test_from_unet_matches_diffusers() -> None:
    torch.manual_seed(0)
    ref_unet = RefUNet2DConditionModel(**UNET_TINY).eval()
    ours_unet = UNet2DConditionModel(**UNET_TINY).eval()
    ours_unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref = RefControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(16, 32)).eval()
    ours = ControlNetModel.from_unet(ours_unet, conditioning_embedding_out_channels=(16, 32)).eval()
    assert {k: v for k, v in ref.config.items() if not k.startswith("_")} == _tuples(ours.config)
    ref_state, ours_state = ref.state_dict(), ours.state_dict()
    assert list(ours_state) == list(ref_state)
    for key, value in ours_state.items():
        if key.startswith(
            ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "controlnet_down", "controlnet_mid")
        ):
            assert torch.equal(value, ref_state[key]), key  # copied from the UNet, or zero
    assert not any(v.any() for k, v in ours_state.items() if k.startswith("controlnet_") and "cond_embedding" not in k)
    _randomise(ref, 5)  # zero convs give all-zero outputs: use non-zero weights to compare the networks
    ours.load_state_dict(ref.state_dict(), strict=True)
    kwargs = _inputs(CONTROLNET_TINY)
    with torch.no_grad():
        _assert_close(ref(timestep=5, **kwargs), ours(timestep=5, **kwargs), REL_TOL)


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


# (not sd2_style_mid_resnet: diffusers' class_embed_type="timestep" feeds float32 into bf16 weights and fails)
@pytest.mark.parametrize("name", ["tiny", "bgr_pooled_class_embeds"])
def test_bfloat16(name: str) -> None:
    config = CASES[name]
    ref, ours = _build(config)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    kwargs = _inputs(config, torch.bfloat16)
    with torch.no_grad():
        expected = ref(timestep=torch.tensor([5, 600]), **kwargs)
        got = ours(timestep=torch.tensor([5, 600]), **kwargs)
    assert got[1].dtype == torch.bfloat16
    _assert_close(expected, got, BF16_TOL)


def test_from_pretrained_and_save_pretrained_round_trip(tmp_path: Path) -> None:
    config = CASES["sd2_style_mid_resnet"]
    ref, _ = _build(config)
    ref.save_pretrained(tmp_path / "ref")
    ours = ControlNetModel.from_pretrained(tmp_path / "ref")
    kwargs = _inputs(config)
    with torch.no_grad():
        expected = ref(timestep=7, **kwargs)
        _assert_close(expected, ours(timestep=7, **kwargs), REL_TOL)
    ours.save_pretrained(tmp_path / "ours")
    again = RefControlNetModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        _assert_close(again(timestep=7, **kwargs), ours(timestep=7, **kwargs), 0.0)
    plain = json.loads(json.dumps({k: v for k, v in ref.config.items() if not k.startswith("_")}))
    assert json.loads(json.dumps({k: v for k, v in again.config.items() if not k.startswith("_")})) == plain


def test_config_fields_and_defaults_match_diffusers() -> None:
    params = inspect.signature(RefControlNetModel.__init__).parameters
    assert CONTROLNET_DEFAULTS == {k: p.default for k, p in params.items() if k != "self"}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("down_block_types", ("DownBlock2D", "KCrossAttnDownBlock2D")),
        ("mid_block_type", None),
        ("class_embed_type", "simple_projection"),
        ("addition_embed_type", "text"),
        ("controlnet_conditioning_channel_order", "rgba"),
        ("conditioning_embedding_out_channels", ()),
        ("layers_per_block", (2, 2)),
        ("norm_num_groups", 3),
        ("act_fn", "tanh"),
        ("not_a_field", 1),
    ],
)
def test_unsupported_options_raise(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        ControlNetModel(**{**CONTROLNET_TINY, option: value})


def test_bad_inputs_raise() -> None:
    _, ours = _build(CONTROLNET_TINY)
    kwargs = _inputs(CONTROLNET_TINY)
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(timestep=1, timestep_cond=torch.zeros(2, 4), **kwargs)
    with pytest.raises(ValueError, match="class_labels"):
        ours(timestep=1, class_labels=torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="unet"):
        ControlNetModel.from_unet(ours)


def test_residual_scales() -> None:
    np.testing.assert_array_equal(controlnet_residual_scales(3, 0.5, False), np.full(4, 0.5, np.float32))
    ramp = controlnet_residual_scales(12, 0.7, True)
    assert ramp.dtype == np.float32 and ramp.shape == (13,)
    np.testing.assert_array_equal(ramp, (torch.logspace(-1, 0, 13) * 0.7).numpy())  # bit-identical to diffusers'
    with pytest.raises(ValueError, match="num_down"):
        controlnet_residual_scales(0, 1.0, True)


def test_from_unet_copies_the_sdxl_addition_embedding() -> None:
    torch.manual_seed(0)
    ref_unet = RefUNet2DConditionModel(**unet_tests.SDXL_TINY).eval()
    ours_unet = UNet2DConditionModel(**unet_tests.SDXL_TINY).eval()
    ours_unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref = RefControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(16, 32)).eval()
    ours = ControlNetModel.from_unet(ours_unet, conditioning_embedding_out_channels=(16, 32)).eval()
    ref_state, ours_state = ref.state_dict(), ours.state_dict()
    assert list(ours_state) == list(ref_state)
    added = [k for k in ours_state if k.startswith("add_embedding.")]
    assert added and all(torch.equal(ours_state[k], ref_state[k]) for k in added)
