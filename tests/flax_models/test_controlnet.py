"""Flax ControlNetModel parity with diffusers 0.42.1: residuals alone and ControlNet -> UNet2DConditionModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_core.flax.models.controlnet import ControlNetModel
from diffusion_core.flax.models.loading import flax_state_to_torch, load_torch_state_dict
from tests.flax_models.test_unet_2d_condition import SD1, build, rel_l2

REL_TOL = 1e-4
BF16_TOL = 2e-2
CONTROLNET = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": 8,
    "norm_num_groups": 2,
    "conditioning_embedding_out_channels": (4, 8, 16),  # two stride-2 convs: control image at 4x latent size
}
VARIANT = {  # bgr control image, pooled residuals, timestep class labels, linear projections, plain mid block
    **CONTROLNET,
    "controlnet_conditioning_channel_order": "bgr",
    "global_pool_conditions": True,
    "class_embed_type": "timestep",
    "use_linear_projection": True,
    "mid_block_type": "UNetMidBlock2D",
    "attention_head_dim": (2, 4),
}


SDXL = {  # text_time addition embedding (SDXL ControlNets)
    **CONTROLNET,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 32,  # 6 ids * 4 + 8 pooled text
}


def build_controlnet(config: dict[str, Any], dtype: Any = jnp.float32) -> tuple[torch.nn.Module, ControlNetModel]:
    """diffusers ControlNet whose zero-initialised convs are given random weights, and ours loaded from it."""
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel(**config).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.normal_(0.0, 0.3)
    ours = nnx.eval_shape(lambda: ControlNetModel(**config, dtype=dtype))
    load_torch_state_dict(ours, ref.state_dict())
    return ref, ours


def controlnet_inputs(config: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(4)
    args = {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([3, 517]),
        "encoder_hidden_states": rng.standard_normal((2, 5, 8)).astype(np.float32),
        "controlnet_cond": rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32),
    }
    if config.get("class_embed_type") == "timestep":
        args["class_labels"] = np.array([7, 300])
    if config.get("addition_embed_type") == "text_time":
        time_ids = np.array([[64, 48, 0, 8, 32, 40], [32, 32, 4, 0, 64, 64]], np.float32)
        args["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((2, 8)).astype(np.float32),
            "time_ids": time_ids,
        }
    return args


def reference(ref: torch.nn.Module, args: dict[str, Any], **kwargs: Any) -> tuple[list[np.ndarray], np.ndarray]:
    tensors = {k: {n: torch.as_tensor(x) for n, x in v.items()} if isinstance(v, dict) else torch.as_tensor(v)
               for k, v in args.items()}  # fmt: skip
    with torch.no_grad():
        out = ref(**tensors, **kwargs)
    return [d.float().numpy() for d in out.down_block_res_samples], out.mid_block_res_sample.float().numpy()


def assert_residuals_close(got: Any, expected: Any, tol: float) -> None:
    (down, mid), (ref_down, ref_mid) = got, expected
    assert len(down) == len(ref_down)
    for d, r in zip(down, ref_down, strict=True):
        assert d.shape == r.shape
        assert rel_l2(d, r) <= tol
    assert rel_l2(mid, ref_mid) <= tol


def test_residuals_under_jit_with_traced_scale() -> None:
    ref, ours = build_controlnet(CONTROLNET)
    args = controlnet_inputs(CONTROLNET)
    graphdef, state = nnx.split(ours)
    run = jax.jit(lambda s, a, scale: nnx.merge(graphdef, s)(**a, conditioning_scale=scale))
    for scale in (1.0, 0.6):  # one compile: the scale is traced
        assert_residuals_close(run(state, args, scale), reference(ref, args, conditioning_scale=scale), REL_TOL)


def test_sdxl_text_time_residuals() -> None:
    ref, ours = build_controlnet(SDXL)
    args = controlnet_inputs(SDXL)
    assert_residuals_close(ours(**args, conditioning_scale=0.8), reference(ref, args, conditioning_scale=0.8), REL_TOL)


def test_residuals_eager_guess_mode() -> None:
    ref, ours = build_controlnet(CONTROLNET)
    args = controlnet_inputs(CONTROLNET)
    expected = reference(ref, args, conditioning_scale=0.8, guess_mode=True)
    assert_residuals_close(ours(**args, conditioning_scale=0.8, guess_mode=True), expected, REL_TOL)


@pytest.mark.slow
def test_variant_residuals() -> None:
    ref, ours = build_controlnet(VARIANT)
    args = controlnet_inputs(VARIANT)
    graphdef, state = nnx.split(ours)
    got = jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a, guess_mode=True))(state, args)
    assert_residuals_close(got, reference(ref, args, guess_mode=True), REL_TOL)


def test_controlnet_into_unet_end_to_end() -> None:
    """ControlNet residuals fed to the UNet, both ours and both diffusers', under one jax.jit."""
    ref_cn, cn = build_controlnet(CONTROLNET)
    ref_unet, unet = build(SD1)
    args = controlnet_inputs(CONTROLNET)
    cn_graph, cn_state = nnx.split(cn)
    unet_graph, unet_state = nnx.split(unet)

    @jax.jit
    def run(cn_state: nnx.State, unet_state: nnx.State, args: dict[str, Any]) -> jax.Array:
        down, mid = nnx.merge(cn_graph, cn_state)(**args, conditioning_scale=0.5)
        unet_args = {k: v for k, v in args.items() if k != "controlnet_cond"}
        return nnx.merge(unet_graph, unet_state)(
            **unet_args, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )

    down, mid = reference(ref_cn, args, conditioning_scale=0.5)
    with torch.no_grad():
        expected = ref_unet(
            torch.from_numpy(args["sample"]), torch.from_numpy(args["timestep"]),
            torch.from_numpy(args["encoder_hidden_states"]),
            down_block_additional_residuals=[torch.from_numpy(d) for d in down],
            mid_block_additional_residual=torch.from_numpy(mid),
        ).sample.numpy()  # fmt: skip
    assert rel_l2(run(cn_state, unet_state, args), expected) <= REL_TOL


@pytest.mark.slow
def test_residuals_bfloat16() -> None:
    config = {**CONTROLNET, "attention_head_dim": 2}  # XLA:CPU aborts on bf16 attention with head_dim 1
    ref, ours = build_controlnet(config, dtype=jnp.bfloat16)
    ref = ref.to(torch.bfloat16)
    args = controlnet_inputs(CONTROLNET)
    expected = reference(
        ref, {k: torch.as_tensor(v).to(torch.bfloat16) if v.dtype == np.float32 else v for k, v in args.items()}
    )
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) if v.dtype == np.float32 else v for k, v in args.items()}
    graphdef, state = nnx.split(ours)
    got = jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a))(state, bf16)
    assert got[1].dtype == jnp.bfloat16
    assert_residuals_close(got, expected, BF16_TOL)


def test_from_pretrained_and_save_round_trip(tmp_path: Path) -> None:
    ref, _ = build_controlnet(CONTROLNET)
    ref.save_pretrained(tmp_path / "ref")
    ours = ControlNetModel.from_pretrained(tmp_path / "ref")
    args = controlnet_inputs(CONTROLNET)
    assert_residuals_close(ours(**args), reference(ref, args), REL_TOL)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours").state_dict()
    original = ref.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("down_block_types", ("KDownBlock2D", "CrossAttnDownBlock2D")),
        ("mid_block_type", None),
        ("controlnet_conditioning_channel_order", "xyz"),
        ("conditioning_embedding_out_channels", ()),
        ("time_embedding_type", "fourier"),
    ],
)
def test_bad_config_raises(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        nnx.eval_shape(lambda: ControlNetModel(**{**CONTROLNET, option: value}))


def test_bad_inputs_raise() -> None:
    model = nnx.eval_shape(lambda: ControlNetModel(**CONTROLNET))
    args = controlnet_inputs(CONTROLNET)
    with pytest.raises(ValueError, match="controlnet_cond"):
        model(**{**args, "controlnet_cond": args["controlnet_cond"][0]})
    with pytest.raises(ValueError, match="class_labels"):
        model(**args, class_labels=np.array([1, 2]))


def test_from_unet_copies_encoder_and_zero_inits() -> None:
    """Same weights as diffusers' ``ControlNetModel.from_unet`` except the randomly drawn conditioning convs."""
    ref_unet, unet = build(SD1)
    expected = diffusers.ControlNetModel.from_unet(
        ref_unet, conditioning_embedding_out_channels=(4, 8, 16)
    ).state_dict()
    ours = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 16))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(nnx.state(ours)))  # all concrete
    got = flax_state_to_torch(ours)
    assert set(got) == set(expected)
    random_init = ("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.blocks")
    for key, value in expected.items():
        if not key.startswith(random_init):
            assert np.array_equal(got[key], value.numpy()), key
    assert not np.any(got["controlnet_mid_block.weight"]) and not np.any(got["controlnet_down_blocks.0.weight"])
