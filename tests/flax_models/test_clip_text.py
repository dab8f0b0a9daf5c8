"""Flax CLIP text encoders vs transformers 5 on random weights: eager, under jit, bfloat16, padding masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from diffusion_core.flax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from diffusion_core.flax.models.loading import flax_state_to_torch, load_torch_state_dict, weight_shapes
from tests.torch_models.test_clip_text import CASES, LEGACY, _inputs

REL_TOL = 1e-4
BF16_TOL = 2e-2
MODELS = {
    "plain": (transformers.CLIPTextModel, CLIPTextModel),
    "projection": (transformers.CLIPTextModelWithProjection, CLIPTextModelWithProjection),
}


def _build(case: str, kind: str, dtype: Any = jnp.float32) -> tuple[torch.nn.Module, nnx.Module]:
    """transformers reference with random weights, and ours loaded from its state dict."""
    ref_cls, our_cls = MODELS[kind]
    torch.manual_seed(0)
    ref = ref_cls(transformers.CLIPTextConfig(**CASES[case])).eval()
    ours = our_cls(CASES[case], rngs=nnx.Rngs(1), dtype=dtype)
    load_torch_state_dict(ours, ref.state_dict())
    return ref, ours


def _rel_l2(a: Any, b: torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), b.double().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _masked_inputs(case: str, masking: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    input_ids, mask = _inputs(CASES[case])
    if masking == "none":
        return input_ids, None
    if masking == "left_padding":  # real tokens flush right: padding queries see no key at all
        return input_ids.flip(-1), mask.flip(-1)
    return input_ids, mask


def _reference(ref: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    with torch.no_grad():
        out = ref(input_ids, attention_mask=mask, output_hidden_states=True)
        text = ref.text_model(input_ids, attention_mask=mask) if hasattr(ref, "text_projection") else out
    return {
        "hidden_states": out.hidden_states,
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": text.pooler_output,
        "text_embeds": getattr(out, "text_embeds", None),
    }


def _compare(got: Any, want: dict[str, Any], tol: float) -> float:
    worst = 0.0
    assert len(got.hidden_states) == len(want["hidden_states"])
    for ours, ref in zip(got.hidden_states, want["hidden_states"], strict=True):
        worst = max(worst, _rel_l2(ours, ref))
    for name in ("last_hidden_state", "pooler_output", "text_embeds"):
        if want[name] is not None:
            worst = max(worst, _rel_l2(getattr(got, name), want[name]))
    assert worst <= tol
    return worst


def test_parameter_tree_mirrors_transformers_state_dict() -> None:
    for kind in MODELS:
        ref, ours = _build("legacy_eos2_quick_gelu", kind)
        state, ref_state = flax_state_to_torch(ours), ref.state_dict()
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
    shapes = weight_shapes(_build("legacy_eos2_quick_gelu", "projection")[1])
    assert shapes[("text_model", "embeddings", "token_embedding", "embedding")] == (1000, 32)
    assert shapes[("text_projection", "kernel")] == (32, 16)
    assert ("text_model", "encoder", "layers", 2, "self_attn", "q_proj", "kernel") in shapes


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masking", ["none", "right_padding", "left_padding"])
def test_matches_transformers_eager(case: str, kind: str, masking: str) -> None:
    ref, ours = _build(case, kind)
    input_ids, mask = _masked_inputs(case, masking)
    jax_mask = None if mask is None else jnp.asarray(mask.numpy())
    got = ours(jnp.asarray(input_ids.numpy()), jax_mask, output_hidden_states=True)
    _compare(got, _reference(ref, input_ids, mask), REL_TOL)


@pytest.mark.parametrize(
    ("case", "kind", "masking"),
    [(case, "projection", "left_padding") for case in CASES] + [("gelu_new", "plain", "none")],
)
def test_matches_transformers_under_jit(case: str, kind: str, masking: str) -> None:
    ref, ours = _build(case, kind)
    input_ids, mask = _masked_inputs(case, masking)
    jax_mask = None if mask is None else jnp.asarray(mask.numpy())
    jitted = nnx.jit(lambda model, i, m: model(i, m, output_hidden_states=True))
    _compare(jitted(ours, jnp.asarray(input_ids.numpy()), jax_mask), _reference(ref, input_ids, mask), REL_TOL)


@pytest.mark.parametrize("kind", list(MODELS))
def test_bfloat16_close_to_float32_reference(kind: str) -> None:
    ref, ours = _build("gelu_mid_eos", kind, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(ours, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    input_ids, mask = _masked_inputs("gelu_mid_eos", "right_padding")
    got = ours(jnp.asarray(input_ids.numpy()), jnp.asarray(mask.numpy()), output_hidden_states=True)
    assert got.last_hidden_state.dtype == jnp.bfloat16
    _compare(got, _reference(ref, input_ids, mask), BF16_TOL)


def test_jit_does_not_retrace_and_skips_hidden_states() -> None:
    ref, ours = _build("eos_last_id", "projection")
    traces = []

    @nnx.jit
    def encode(model: nnx.Module, ids: jax.Array, mask: jax.Array) -> Any:
        traces.append(1)
        return model(ids, mask)

    input_ids, mask = _inputs(CASES["eos_last_id"], seq_len=77)
    for _ in range(2):
        got = encode(ours, jnp.asarray(input_ids.numpy()), jnp.asarray(mask.numpy()))
    assert len(traces) == 1
    assert got.hidden_states is None
    with torch.no_grad():
        want = ref(input_ids, attention_mask=mask).text_embeds
    assert _rel_l2(got.text_embeds, want) <= REL_TOL


def test_plain_jax_jit_over_split_state() -> None:
    """``jax.jit`` (not only ``nnx.jit``) works on the split graph/state, with a static hidden-states flag."""
    ref, ours = _build("gelu_mid_eos", "plain")
    graphdef, state = nnx.split(ours)

    @jax.jit
    def encode(state: nnx.State, ids: jax.Array, mask: jax.Array) -> Any:
        return nnx.merge(graphdef, state)(ids, mask, output_hidden_states=True)

    input_ids, mask = _masked_inputs("gelu_mid_eos", "right_padding")
    got = encode(state, jnp.asarray(input_ids.numpy()), jnp.asarray(mask.numpy()))
    _compare(got, _reference(ref, input_ids, mask), REL_TOL)


def test_attention_dropout_only_in_train_mode() -> None:
    cfg = {**LEGACY, "attention_dropout": 0.5}
    model = CLIPTextModel(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(_inputs(cfg)[0].numpy())
    first, again = model(ids).last_hidden_state, model(ids).last_hidden_state
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    model.train()
    dropped = model(ids).last_hidden_state
    assert np.isfinite(np.asarray(dropped)).all()
    assert not np.allclose(np.asarray(dropped), np.asarray(first))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(ids).last_hidden_state), np.asarray(first))


@pytest.mark.parametrize(
    ("bad_input", "name"),
    [
        (np.zeros((2, 78), np.int32), "input_ids"),  # longer than max_position_embeddings
        (np.zeros((2, 0), np.int32), "input_ids"),
        (np.zeros(5, np.int32), "input_ids"),
        (np.zeros((2, 5), np.float32), "input_ids"),  # float ids
        ([[0, 2]], "input_ids"),
        (np.full((2, 5), 1000), "input_ids"),  # out of the vocabulary
        (np.full((2, 5), -1), "input_ids"),
    ],
)
def test_bad_input_ids_raise(bad_input: Any, name: str) -> None:
    model = CLIPTextModelWithProjection(LEGACY)
    with pytest.raises(ValueError, match=name):
        model(bad_input)


def test_bad_attention_mask_and_config_raise() -> None:
    model = CLIPTextModel(LEGACY)
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 6)))
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel({**LEGACY, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextModelWithProjection({**LEGACY, "projection_dim": 0})
    with pytest.raises(ValueError, match="attention_dropout"):
        CLIPTextModel({**LEGACY, "attention_dropout": 1.5})
