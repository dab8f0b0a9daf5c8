"""UNet2DModel parity with diffusers: same state-dict keys, same outputs on random weights."""

from __future__ import annotations

import json
from typing import Any

import diffusers
import pytest
import torch

from diffusion_core.configuration import config_to_json_string
from diffusion_core.torch.models import UNet2DModel

REL_TOL = 1e-5

# DDPM fast-test config (diffusers' pipeline tests), the base every case below edits.
BASE: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

CASES: dict[str, dict[str, Any]] = {
    "ddpm_fast": {},
    "fourier": {
        "time_embedding_type": "fourier",
        "flip_sin_to_cos": False,
        "mid_block_scale_factor": 2**-0.5,
        "center_input_sample": True,
    },
    "scale_shift": {
        "resnet_time_scale_shift": "scale_shift",
        "layers_per_block": 2,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "act_fn": "mish",
    },
    "class_embeds": {"num_class_embeds": 10, "time_embedding_dim": 24, "norm_eps": 1e-6, "dropout": 0.1},
    "head_dim_no_mid_attn": {
        "block_out_channels": (8, 16, 16),
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        "attention_head_dim": 4,
        "add_attention": False,
        "downsample_padding": 0,
    },
    "resnet_resample_head_none": {
        "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D"),
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": None,
        "attn_norm_num_groups": 2,
    },
    "timestep_class_no_mid": {"class_embed_type": "timestep", "mid_block_type": None, "layers_per_block": 2},
    # unCLIP's super-resolution UNets: resnet resamplers in Resnet{Down,Up}sampleBlock2D, FiLM time embedding
    "unclip_super_res": {
        "down_block_types": ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        "resnet_time_scale_shift": "scale_shift",
    },
    "learned_time": {"time_embedding_type": "learned", "num_train_timesteps": 1000},
}


def _build(overrides: dict[str, Any]) -> tuple[torch.nn.Module, UNet2DModel]:
    config = {**BASE, **overrides}
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**config).eval()
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _timesteps(name: str) -> list[Any]:
    """Scalar and per-batch timesteps valid for the case (fourier takes positive sigmas)."""
    if name == "fourier":
        return [torch.tensor(0.7), torch.tensor([0.05, 3.0]), 2]
    return [10, 42.0, torch.tensor(999), torch.tensor([3, 517]), torch.tensor([1.0, 250.0])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(name: str) -> None:
    overrides = CASES[name]
    ref, ours = _build(overrides)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert list(ours.state_dict()) == list(ref.state_dict())
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 3, 8, 8, generator=generator)
    conditional = "num_class_embeds" in overrides or "class_embed_type" in overrides
    labels = torch.tensor([3, 7]) if conditional else None
    for t in _timesteps(name):
        if name == "learned_time" and (isinstance(t, float) or torch.is_tensor(t) and t.is_floating_point()):
            continue
        with torch.no_grad():
            expected = ref(sample, t, class_labels=labels).sample
            got = ours(sample, t, class_labels=labels)
        assert got.shape == expected.shape
        assert _rel_l2(got, expected) <= REL_TOL, (name, t)


def test_config_and_from_config() -> None:
    ref, ours = _build(CASES["class_embeds"])
    assert ours.config["num_class_embeds"] == 10
    assert ours.config["block_out_channels"] == (4, 8)
    # A diffusers config.json (lists, _class_name, _diffusers_version) builds the same model.
    on_disk = json.loads(config_to_json_string({**ref.config, "_class_name": "UNet2DModel"}))
    clone = UNet2DModel.from_config(on_disk).eval()
    assert clone.config["block_out_channels"] == [4, 8]
    clone.load_state_dict(ref.state_dict(), strict=True)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(clone(sample, 5, torch.tensor([1, 2])), ours(sample, 5, torch.tensor([1, 2])))


def test_config_fields_match_diffusers() -> None:
    ref = diffusers.UNet2DModel(**BASE)
    ours = UNet2DModel(**BASE)
    ref_fields = {k for k in ref.config if not k.startswith("_")}
    assert set(ours.config) == ref_fields
    for key in ref_fields:
        value = ref.config[key]
        assert (list(value) if isinstance(value, tuple) else value) == (
            list(ours.config[key]) if isinstance(ours.config[key], tuple) else ours.config[key]
        ), key


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
        UNet2DModel(**{**BASE, option: value})


def test_bad_inputs_raise() -> None:
    _, ours = _build({})
    sample = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        ours(sample, 1, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block_out_channels"):
        UNet2DModel(**{**BASE, "block_out_channels": (4, 8, 8)})
