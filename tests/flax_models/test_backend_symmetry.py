"""The torch and flax models are one API: same call signatures, and flax's masks give torch's numbers."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from flax import nnx

import diffusion_core.flax as dc_flax
import diffusion_core.flax.models as flax_models
import diffusion_core.torch as dc_torch
import diffusion_core.torch.models as torch_models
from diffusion_core.flax.models.loading import load_torch_state_dict
from tests.flax_models.test_unet_2d_condition import SD1, X2_LATENT

REL_TOL = 1e-4

# (class name, torch method, flax method): the public call of each model in both backends
CALLS = [
    ("UNet2DModel", "forward", "__call__"),
    ("UNet2DConditionModel", "forward", "__call__"),
    ("AutoencoderKL", "forward", "__call__"),
    ("AutoencoderKL", "encode", "encode"),
    ("AutoencoderKL", "decode", "decode"),
    ("ControlNetModel", "forward", "__call__"),
    ("MultiControlNetModel", "forward", "__call__"),
    ("CLIPTextModel", "forward", "__call__"),
    ("CLIPTextModelWithProjection", "forward", "__call__"),
    ("T5EncoderModel", "forward", "__call__"),
]

SD1_TINY = SD1  # diffusers' SD fast-test UNet: all attention runs at 8x8 for a 16x16 sample
K_TINY = X2_LATENT  # sd-x2-latent-upscaler layout: K blocks with KAttentionBlocks, fourier time


@pytest.mark.parametrize(("name", "torch_method", "flax_method"), CALLS)
def test_call_signatures_match(name: str, torch_method: str, flax_method: str) -> None:
    """Parameter names and order of the public call are the same in both backends (positional calls port)."""
    torch_params = list(inspect.signature(getattr(getattr(dc_torch, name), torch_method)).parameters)
    flax_params = list(inspect.signature(getattr(getattr(dc_flax, name), flax_method)).parameters)
    assert torch_params == flax_params


SHARED_MODULES = sorted(
    name
    for name in set(torch_models.__all__) & set(flax_models.__all__)
    if hasattr(getattr(torch_models, name), "forward")
)


def test_every_shared_module_has_the_same_call() -> None:
    """Blocks and layers too: torch ``forward`` and flax ``__call__`` take the same parameters in the same order."""
    assert {"KAttentionBlock", "Transformer2DModel", "CrossAttnDownBlock2D", "KUpBlock2D"} <= set(SHARED_MODULES)
    differ = {}
    for name in SHARED_MODULES:
        torch_params = list(inspect.signature(getattr(torch_models, name).forward).parameters)
        flax_params = list(inspect.signature(getattr(flax_models, name).__call__).parameters)
        if torch_params != flax_params:
            differ[name] = (torch_params, flax_params)
    assert not differ


def _pair(config: dict[str, Any]) -> tuple[torch.nn.Module, nnx.Module]:
    """Our torch model with random weights and our flax model filled with the same weights."""
    torch.manual_seed(0)
    ours_torch = dc_torch.UNet2DConditionModel(**config).eval()
    ours_flax = nnx.eval_shape(lambda: dc_flax.UNet2DConditionModel(**config))
    load_torch_state_dict(ours_flax, ours_torch.state_dict())
    return ours_torch, ours_flax


def _both(ours_torch: torch.nn.Module, ours_flax: nnx.Module, **args: Any) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        expected = ours_torch(**{k: None if v is None else torch.as_tensor(v) for k, v in args.items()}).numpy()
    return np.asarray(ours_flax(**args)), expected


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_flax_attention_masks_match_torch() -> None:
    """Self- (``attention_mask``, over the 8x8 tokens) and cross-attention masks: flax gives torch's output."""
    ours_torch, ours_flax = _pair(SD1_TINY)
    rng = np.random.default_rng(1)
    args = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([3, 517]),
        "encoder_hidden_states": rng.standard_normal((2, 5, 8)).astype(np.float32),
    }
    self_mask = np.ones((2, 64), np.float32)
    self_mask[0, ::3] = 0
    cross_mask = np.ones((2, 5), np.float32)
    cross_mask[0, 3:] = 0
    cross_mask[1, 0] = 0
    plain, _ = _both(ours_torch, ours_flax, **args)
    for masks in ({"attention_mask": self_mask}, {"encoder_attention_mask": cross_mask}):
        got, expected = _both(ours_torch, ours_flax, **args, **masks)
        assert _rel_l2(got, expected) <= REL_TOL, masks.keys()
        assert _rel_l2(plain, got) > 10 * REL_TOL  # the mask changes the answer well beyond the tolerance
    with pytest.raises(ValueError, match="attention mask"):
        ours_flax(**args, attention_mask=self_mask[:, None])


def test_flax_k_block_cross_mask_matches_torch() -> None:
    """The K-UNet's KAttentionBlocks take the same encoder mask in both backends."""
    ours_torch, ours_flax = _pair(K_TINY)
    rng = np.random.default_rng(2)
    args = {
        "sample": rng.standard_normal((2, 8, 8, 8)).astype(np.float32),
        "timestep": np.array([-0.4, 0.3], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 5, 16)).astype(np.float32),
        "timestep_cond": rng.standard_normal((2, 24)).astype(np.float32),
    }
    cross_mask = np.ones((2, 5), np.float32)
    cross_mask[0, 2:] = 0
    plain, _ = _both(ours_torch, ours_flax, **args)
    got, expected = _both(ours_torch, ours_flax, **args, encoder_attention_mask=cross_mask)
    assert _rel_l2(got, expected) <= REL_TOL
    assert _rel_l2(plain, got) > 10 * REL_TOL


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("UNet2DModel", {"act_fn": "tanh"}, "act_fn"),
        ("AutoencoderKL", {"act_fn": "tanh"}, "act_fn"),
        ("UNet2DConditionModel", {**SD1_TINY, "time_embedding_act_fn": "tanh"}, "time_embedding_act_fn"),
        ("UNet2DConditionModel", {**SD1_TINY, "timestep_post_act": "tanh"}, "timestep_post_act"),
    ],
)
def test_bad_activation_is_one_error_in_both_backends(name: str, options: dict[str, Any], field: str) -> None:
    """Activation names are checked once, in the core config checks: the same ValueError in both backends."""
    messages = []
    for backend in (dc_torch, dc_flax):
        with pytest.raises(ValueError, match=f"^{field}: unsupported activation 'tanh'") as err:
            getattr(backend, name)(**options)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("name", ["UNet2DModel", "AutoencoderKL"])
def test_unknown_constructor_option_is_a_value_error(name: str) -> None:
    for backend in (dc_torch, dc_flax):
        with pytest.raises(ValueError, match="unknown config options"):
            getattr(backend, name)(not_an_option=1)
