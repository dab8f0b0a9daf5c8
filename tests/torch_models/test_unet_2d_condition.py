"""UNet2DConditionModel parity with diffusers 0.42.1: same state-dict keys, same outputs on random weights."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core.configuration import config_to_json_string
from diffusion_core.models.model_config import UNET_2D_CONDITION_DEFAULTS
from diffusion_core.models.unet_condition_config import attention_mask_bias
from diffusion_core.torch.models.attention import BasicTransformerBlock
from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel

# The oracles (diffusers imports them lazily: pay that at collection, not in the first test).
RefUNet2DConditionModel = diffusers.UNet2DConditionModel
REL_TOL = 1e-5
BF16_TOL = 2e-2

# diffusers' Stable Diffusion fast-test UNet (tests/pipelines/stable_diffusion), the base of the cases.
SD1_TINY: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 8,
    "norm_num_groups": 2,
}
THREE_LEVELS: dict[str, Any] = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# diffusers' x2 latent upscaler fast-test UNet (K blocks, Fourier time, timestep_cond).
X2_TINY: dict[str, Any] = {
    "act_fn": "gelu",
    "attention_head_dim": 8,
    "norm_num_groups": None,
    "block_out_channels": (32, 32, 64, 64),
    "time_cond_proj_dim": 160,
    "conv_in_kernel": 1,
    "conv_out_kernel": 1,
    "cross_attention_dim": 32,
    "down_block_types": ("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    "in_channels": 8,
    "mid_block_type": None,
    "only_cross_attention": False,
    "out_channels": 5,
    "resnet_time_scale_shift": "scale_shift",
    "time_embedding_type": "fourier",
    "timestep_post_act": "gelu",
    "up_block_types": ("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
}

# diffusers' SDXL fast-test UNet (tests/pipelines/stable_diffusion_xl): text_time addition embedding.
SDXL_TINY: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + 32 pooled text
    "cross_attention_dim": 64,
    "norm_num_groups": 1,
}

CASES: dict[str, dict[str, Any]] = {
    "sdxl_tiny": SDXL_TINY,
    "sdxl_refiner_like": {
        **SDXL_TINY,
        "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 52,  # 5 time ids (aesthetic score) * 4 + 32
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "time_embedding_act_fn": "silu",
        "transformer_layers_per_block": (2, 3),
    },
    "sd1_tiny": SD1_TINY,
    "sd2_tiny": {
        **SD1_TINY,
        **THREE_LEVELS,
        "attention_head_dim": (2, 4, 8),
        "use_linear_projection": True,
        "upcast_attention": True,
        "cross_attention_dim": 12,
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 1),
    },
    "inpaint_9ch": {**SD1_TINY, "in_channels": 9},
    "pix2pix_8ch": {**SD1_TINY, "in_channels": 8},
    "x4_upscaler_tiny": {
        **SD1_TINY,
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "in_channels": 7,
        "num_class_embeds": 100,
        "attention_head_dim": 8,
        "use_linear_projection": True,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
    },
    "x2_latent_upscaler_tiny": X2_TINY,
    "mid_none_scale_shift": {
        **SD1_TINY,
        "mid_block_type": None,
        "resnet_time_scale_shift": "scale_shift",
        "center_input_sample": True,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    },
    "mid_resnet_only_cross": {
        **SD1_TINY,
        **THREE_LEVELS,
        "mid_block_type": "UNetMidBlock2D",
        "only_cross_attention": (True, False, False),
        "layers_per_block": (1, 2, 1),
        "cross_attention_dim": (8, 8, 8),
        "mid_block_scale_factor": 0.7,
        "downsample_padding": 0,
    },
    "class_timestep_concat": {
        **SD1_TINY,
        "class_embed_type": "timestep",
        "class_embeddings_concat": True,
        "time_embedding_act_fn": "silu",
        "time_embedding_dim": 24,
        "act_fn": "mish",
        "norm_eps": 1e-6,
    },
    "class_projection_hid_proj": {
        **SD1_TINY,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 6,
        "encoder_hid_dim": 10,
        "conv_in_kernel": 5,
        "conv_out_kernel": 1,
        "timestep_post_act": "silu",
        "time_cond_proj_dim": 7,
    },
    "asymmetric_transformer_layers": {
        **SD1_TINY,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "transformer_layers_per_block": ((1,), (2,)),
        "reverse_transformer_layers_per_block": ((2, 1), (1, 3)),
        "attention_head_dim": 2,
    },
    "class_simple_projection": {
        **SD1_TINY,
        "class_embed_type": "simple_projection",
        "projection_class_embeddings_input_dim": 6,
        "dropout": 0.1,
    },
}


def _build(config: dict[str, Any]) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = RefUNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()))


def _inputs(config: dict[str, Any], size: int = 16, batch: int = 2) -> dict[str, Any]:
    """Random call arguments that every option of ``config`` needs."""
    g = torch.Generator().manual_seed(1)
    context_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    context_dim = context_dim if isinstance(context_dim, int) else context_dim[0]
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, config["in_channels"], size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, context_dim, generator=g),
    }
    kind = config.get("class_embed_type")
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([3, 50])[:batch]
    elif kind == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 700])[:batch]
    elif kind in ("projection", "simple_projection"):
        kwargs["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"], generator=g)
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"], generator=g)
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = text_time_inputs(config, batch, g)
    return kwargs


def text_time_inputs(config: dict[str, Any], batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """SDXL's ``added_cond_kwargs``: pooled text (B, D) and size/crop ids (B, n), widths from the config."""
    ids = (config["projection_class_embeddings_input_dim"] - 32) // config["addition_time_embed_dim"]
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 32.0, 40.0, 6.0][:ids]] * batch)
    return {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": time_ids + torch.arange(batch)[:, None]}


def _timesteps(config: dict[str, Any]) -> list[Any]:
    """Python, 0-d and (B,) timesteps (the Fourier embedding takes log-sigmas of any sign)."""
    if config.get("time_embedding_type") == "fourier":
        return [torch.tensor([0.3, -1.2]), torch.tensor(0.5), 0.25]
    return [10, 42.0, torch.tensor(999), torch.tensor([3, 517]), torch.tensor([1.0, 250.5])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(name: str) -> None:
    config = CASES[name]
    ref, ours = _build(config)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [tuple(v.shape) for v in ref.state_dict().values()]
    kwargs = _inputs(config)
    for t in _timesteps(config):
        with torch.no_grad():
            expected = ref(timestep=t, **kwargs).sample
            got = ours(timestep=t, **kwargs)
        assert got.shape == expected.shape
        assert _rel_l2(got, expected) <= REL_TOL, (name, t)


@pytest.mark.parametrize("name", ["sd1_tiny", "x2_latent_upscaler_tiny", "sd2_tiny"])
def test_odd_sizes_and_encoder_mask(name: str) -> None:
    """Latents not divisible by 2**levels forward their skip sizes; a (B, S) cross mask drops tokens."""
    config = CASES[name]
    ref, ours = _build(config)
    kwargs = _inputs(config, size=24 if name.startswith("x2") else 13)  # K resamplers need 2**levels | size
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    mask[1, 0] = 0
    t = _timesteps(config)[0]
    with torch.no_grad():
        expected = ref(timestep=t, encoder_attention_mask=mask, **kwargs).sample
        got = ours(timestep=t, encoder_attention_mask=mask, **kwargs)
        unmasked = ours(timestep=t, **kwargs)
    assert got.shape == expected.shape
    assert _rel_l2(got, expected) <= REL_TOL
    assert _rel_l2(unmasked, got) > 1e-4  # the mask changes the answer


def test_self_attention_mask() -> None:
    """diffusers applies ``attention_mask`` to the self-attention keys (all attention here runs at 8x8)."""
    ref, ours = _build(SD1_TINY)
    kwargs = _inputs(SD1_TINY, size=16)
    mask = torch.ones(2, 64)
    mask[0, ::3] = 0
    with torch.no_grad():
        expected = ref(timestep=9, attention_mask=mask, **kwargs).sample
        got = ours(timestep=9, attention_mask=mask, **kwargs)
        unmasked = ours(timestep=9, **kwargs)
    assert _rel_l2(got, expected) <= REL_TOL
    assert _rel_l2(unmasked, got) > 1e-4
    with pytest.raises(ValueError, match="attention mask"):
        ours(timestep=9, attention_mask=mask[:, None], **kwargs)


@pytest.mark.parametrize(
    "options", [{"double_self_attention": True}, {"cross_attention_dim": 6, "only_cross_attention": True}]
)
def test_transformer_block_variants(options: dict[str, Any]) -> None:
    from diffusers.models.attention import BasicTransformerBlock as RefBlock

    torch.manual_seed(0)
    ref = RefBlock(8, 2, 4, **options).eval()
    ours = BasicTransformerBlock(8, 2, 4, **options).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g)
    context = torch.randn(2, 3, 6, generator=g) if "cross_attention_dim" in options else None
    with torch.no_grad():
        assert _rel_l2(ours(x, context), ref(x, encoder_hidden_states=context)) <= REL_TOL


def test_attention_mask_bias_is_framework_neutral() -> None:
    mask = np.array([[1, 0, 1], [0, 0, 1]])
    expected = np.array([[[0.0, -10000.0, 0.0]], [[-10000.0, -10000.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(attention_mask_bias(mask, np.zeros(1, np.float32)), expected)
    got = attention_mask_bias(torch.from_numpy(mask), torch.zeros(1, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 3)
    assert torch.equal(got, torch.from_numpy(expected).to(torch.bfloat16))  # -10000 rounds to -9984, as diffusers'
    assert attention_mask_bias(None, np.zeros(1)) is None


@pytest.mark.parametrize("name", ["sd2_tiny", "x2_latent_upscaler_tiny", "x4_upscaler_tiny"])
def test_bfloat16(name: str) -> None:
    config = CASES[name]
    ref, ours = _build(config)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs(config).items()}
    t = _timesteps(config)[0]
    with torch.no_grad():
        expected = ref(timestep=t, **kwargs).sample
        got = ours(timestep=t, **kwargs)
    assert got.dtype == torch.bfloat16
    assert _rel_l2(got, expected) <= BF16_TOL


def test_from_pretrained_and_save_pretrained_round_trip(tmp_path: Path) -> None:
    config = CASES["sd2_tiny"]
    ref, _ = _build(config)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    kwargs = _inputs(config)
    with torch.no_grad():
        expected = ref(timestep=7, **kwargs).sample
        assert _rel_l2(ours(timestep=7, **kwargs), expected) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    again = RefUNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(timestep=7, **kwargs).sample, expected)
    assert _plain(again.config) == _plain(ref.config)
    half = UNet2DConditionModel.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    bf16_kwargs = {k: v.to(torch.bfloat16) for k, v in kwargs.items()}
    with torch.no_grad():
        assert _rel_l2(half(timestep=7, **bf16_kwargs), expected) <= BF16_TOL


def _plain(config: Any) -> dict[str, Any]:
    """A config as its JSON form (tuples -> lists), without the ``_`` metadata keys."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def test_from_config_of_a_diffusers_config_json() -> None:
    ref, ours = _build(CASES["x4_upscaler_tiny"])
    on_disk = json.loads(config_to_json_string({**ref.config, "_class_name": "UNet2DConditionModel"}))
    clone = UNet2DConditionModel.from_config(on_disk).eval()
    assert clone.config["block_out_channels"] == [32, 32, 64]
    clone.load_state_dict(ref.state_dict(), strict=True)
    kwargs = _inputs(CASES["x4_upscaler_tiny"])
    with torch.no_grad():
        assert torch.equal(clone(timestep=3, **kwargs), ours(timestep=3, **kwargs))


def test_config_fields_and_defaults_match_diffusers() -> None:
    params = inspect.signature(RefUNet2DConditionModel.__init__).parameters
    ref_defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert set(UNET_2D_CONDITION_DEFAULTS) == set(ref_defaults)
    assert UNET_2D_CONDITION_DEFAULTS == ref_defaults
    ref, ours = _build(SD1_TINY)
    assert set(ours.config) == {k for k in ref.config if not k.startswith("_")}


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("down_block_types", ("DownBlock2D", "SkipDownBlock2D"), None),
        ("up_block_types", ("SkipUpBlock2D", "UpBlock2D"), None),
        ("mid_block_type", "UNetMidBlock2DAttn", None),
        ("time_embedding_type", "learned", None),
        ("class_embed_type", "projection", "projection_class_embeddings_input_dim"),
        ("addition_embed_type", "text_image", None),
        ("encoder_hid_dim_type", "image_proj", None),
        ("dual_cross_attention", True, None),
        ("attention_type", "gated", None),
        ("num_attention_heads", 2, None),
        ("attention_head_dim", (2, 4, 8), None),
        ("attention_head_dim", 9, None),
        ("layers_per_block", 0, None),
        ("norm_num_groups", 3, None),
        ("conv_in_kernel", 2, None),
        ("transformer_layers_per_block", ((1,), (1, 1)), None),
        ("resnet_time_scale_shift", "spatial", None),
        ("act_fn", "tanh", None),
        ("timestep_post_act", "softsign", None),
        ("not_a_field", 1, None),
    ],
)
def test_unsupported_options_raise(option: str, value: Any, named: str | None) -> None:
    with pytest.raises(ValueError, match=named or option):
        UNet2DConditionModel(**{**SD1_TINY, option: value})


def test_bad_inputs_raise() -> None:
    _, ours = _build(SD1_TINY)
    kwargs = _inputs(SD1_TINY)
    with pytest.raises(ValueError, match="timestep"):
        ours(timestep=torch.tensor([1, 2, 3]), **kwargs)
    with pytest.raises(ValueError, match="class_labels"):
        ours(timestep=1, class_labels=torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(timestep=1, timestep_cond=torch.zeros(2, 4), **kwargs)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(kwargs["sample"], 1, kwargs["encoder_hidden_states"][0])
    with pytest.raises(ValueError, match="sample"):
        ours(kwargs["sample"][0], 1, kwargs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        ours(timestep=1, added_cond_kwargs={"text_embeds": torch.zeros(2, 4)}, **kwargs)


@pytest.mark.parametrize("missing", ["addition_time_embed_dim", "projection_class_embeddings_input_dim"])
def test_text_time_needs_its_widths(missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        UNet2DConditionModel(**{**SDXL_TINY, missing: None})


@pytest.mark.parametrize("dropped", ["text_embeds", "time_ids"])
def test_text_time_inputs_are_required(dropped: str) -> None:
    _, ours = _build(SDXL_TINY)
    kwargs = _inputs(SDXL_TINY)
    del kwargs["added_cond_kwargs"][dropped]
    with pytest.raises(ValueError, match=f"added_cond_kwargs: '{dropped}'"):
        ours(timestep=1, **kwargs)


# Published UNet configs (unet/config.json of stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1).
_SD_BLOCKS: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
SD15_UNET = {**_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
SD21_UNET = {
    **_SD_BLOCKS,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}


@pytest.mark.slow
@pytest.mark.parametrize("config", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_configs(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ref = RefUNet2DConditionModel(**config).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(**config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # shares the tensors: one copy in memory
    ours.eval()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=g)
    with torch.no_grad():
        expected = ref(sample, 981, context).sample
        got = ours(sample, 981, context)
    assert _rel_l2(got, expected) <= REL_TOL
