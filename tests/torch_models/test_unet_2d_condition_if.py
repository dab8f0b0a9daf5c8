"""UNet2DConditionModel's DeepFloyd IF / unCLIP options vs diffusers 0.42.1, every parameter random.

Added-K/V attention blocks (``SimpleCrossAttn*``), resnet resamplers (``Resnet*sampleBlock2D``),
``addition_embed_type="text"``, ``encoder_hid_dim``, ``class_embed_type="timestep"`` (IF stage II),
``resnet_skip_time_act`` / ``resnet_out_scale_factor``, ``cross_attention_norm``, ``only_cross_attention``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel

REL_TOL = 1e-5

# diffusers' DeepFloyd IF fast-test UNets (tests/pipelines/deepfloyd_if/__init__.py), stage I and stage II.
IF_STAGE_I: dict[str, Any] = {
    "sample_size": 32,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "in_channels": 3,
    "out_channels": 6,
    "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
    "attention_head_dim": 8,
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
    "cross_attention_norm": "group_norm",
    "resnet_time_scale_shift": "scale_shift",
    "act_fn": "gelu",
}
IF_STAGE_II: dict[str, Any] = {
    **IF_STAGE_I,
    "layers_per_block": (1, 2),
    "in_channels": 6,
    "class_embed_type": "timestep",
    "mid_block_scale_factor": 1.414,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 32,
}
CASES: dict[str, dict[str, Any]] = {
    "if_stage_i": IF_STAGE_I,
    "if_stage_ii": IF_STAGE_II,
    # the published IF checkpoints' resnet options, a projected 48-wide text, three levels
    "if_skip_time_act_three_levels": {
        **IF_STAGE_I,
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        "up_block_types": ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "encoder_hid_dim": 48,
        "addition_embed_type_num_heads": 4,
        "resnet_skip_time_act": True,
        "resnet_out_scale_factor": 1.5,
        "attention_head_dim": (8, 16, 32),
        "layers_per_block": 2,
    },
    # per-block only_cross_attention, a LayerNorm'd context, one head where the head dim is None
    "only_cross_layer_norm": {
        **IF_STAGE_I,
        "block_out_channels": (32, 32),  # diffusers' LayerNorm of the context is as wide as the block
        "only_cross_attention": (False, True),
        "mid_block_only_cross_attention": True,
        "cross_attention_norm": "layer_norm",
        "attention_head_dim": (None, 16),
        "addition_embed_type": None,
        "encoder_hid_dim": None,
    },
    # unCLIP's decoder: identity class embedding of the image embedding, no context norm, SiLU
    "unclip_decoder_like": {
        **IF_STAGE_I,
        "class_embed_type": "identity",
        "cross_attention_norm": None,
        "addition_embed_type": None,
        "encoder_hid_dim": None,
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
    },
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (norm scales, biases and the pooling's position included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _build(config: dict[str, Any]) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    _randomise(ref, 0)
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()))


def if_inputs(config: dict[str, Any], size: int = 16, batch: int = 2) -> dict[str, Any]:
    """Random call arguments (sample, 5 context tokens, class labels) for one of the CASES."""
    g = torch.Generator().manual_seed(1)
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, config["in_channels"], size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, width, generator=g),
    }
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 700])[:batch]
    elif config.get("class_embed_type") == "identity":
        kwargs["class_labels"] = torch.randn(batch, 4 * config["block_out_channels"][0], generator=g)
    return kwargs


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(name: str) -> None:
    config = CASES[name]
    ref, ours = _build(config)
    assert list(ours.state_dict()) == list(ref.state_dict())
    kwargs = if_inputs(config)
    for t in (10, 517.0, torch.tensor([3, 999])):
        with torch.no_grad():
            expected = ref(timestep=t, **kwargs).sample
            got = ours(timestep=t, **kwargs)
        assert got.shape == expected.shape
        assert _rel_l2(got, expected) <= REL_TOL, (name, t)


@pytest.mark.parametrize(
    ("name", "field"), [("if_stage_ii", "encoder_attention_mask"), ("unclip_decoder_like", "attention_mask")]
)
def test_context_masks(name: str, field: str) -> None:
    """A (B, S) mask drops context tokens (unCLIP passes its text mask as ``attention_mask``); H*W keys stay."""
    config = CASES[name]
    ref, ours = _build(config)
    kwargs = if_inputs(config)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    mask[1, 0] = 0
    with torch.no_grad():
        expected = ref(timestep=42, **{field: mask}, **kwargs).sample
        got = ours(timestep=42, **{field: mask}, **kwargs)
        unmasked = ours(timestep=42, **kwargs)
    assert _rel_l2(got, expected) <= REL_TOL
    assert _rel_l2(unmasked, got) > 1e-4  # the mask changes the answer


def test_skip_time_act_and_text_embedding_matter() -> None:
    """Guards against a degenerate reference: each IF option changes the output."""
    config = CASES["if_stage_i"]
    _, ours = _build(config)
    kwargs = if_inputs(config)
    with torch.no_grad():
        base = ours(timestep=10, **kwargs)
        skip = UNet2DConditionModel(**{**config, "resnet_skip_time_act": True}).eval()
        skip.load_state_dict(ours.state_dict())
        assert _rel_l2(skip(timestep=10, **kwargs), base) > 1e-3
        no_text = UNet2DConditionModel(**{**config, "addition_embed_type": None}).eval()
        weights = {k: v for k, v in ours.state_dict().items() if not k.startswith("add_embedding.")}
        no_text.load_state_dict(weights, strict=True)
        assert _rel_l2(no_text(timestep=10, **kwargs), base) > 1e-3


def test_round_trip_with_diffusers(tmp_path: Path) -> None:
    config = CASES["if_stage_ii"]
    ref, _ = _build(config)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    kwargs = if_inputs(config)
    with torch.no_grad():
        expected = ref(timestep=7, **kwargs).sample
        assert _rel_l2(ours(timestep=7, **kwargs), expected) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(timestep=7, **kwargs).sample, expected)


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("cross_attention_norm", "rms_norm", "cross_attention_norm"),
        ("addition_embed_type_num_heads", 3, "addition_embed_type_num_heads"),
        ("addition_embed_type", "text_image", "addition_embed_type"),
        ("attention_head_dim", (8, None), "attention_head_dim"),
        ("cross_attention_dim", 24, "cross_attention_dim"),  # group_norm of the context needs a multiple of 32
        ("mid_block_only_cross_attention", "yes", "mid_block_only_cross_attention"),
        ("cross_attention_norm", "layer_norm", "cross_attention_norm"),  # context 32 wide, second block 64
    ],
)
def test_bad_options_raise(option: str, value: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        UNet2DConditionModel(**{**IF_STAGE_I, option: value})
