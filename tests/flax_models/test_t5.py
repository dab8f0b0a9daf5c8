"""Flax T5 encoder vs transformers 5 on random weights: eager, under jit, padding masks, half precision, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import diffusion_core.torch.models as torch_models
from diffusion_core.flax.models import T5EncoderModel
from diffusion_core.flax.models.loading import load_torch_state_dict
from diffusion_core.models.t5_config import clamp_float16
from tests.torch_models.test_t5 import CASES, TINY, build_reference, inputs

REL_TOL = 1e-4


def rel_l2(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(ref: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    with torch.no_grad():
        return ref(ids, attention_mask=mask).last_hidden_state.float().numpy()


def _ours(ref: torch.nn.Module, case: str, dtype: Any = jnp.float32) -> T5EncoderModel:
    ours = T5EncoderModel(CASES[case], rngs=nnx.Rngs(1), dtype=dtype)
    load_torch_state_dict(ours, {k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"})
    return ours


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_matches_transformers(case: str, masked: bool) -> None:
    ref = build_reference(case)
    ours = _ours(ref, case)
    ids, mask = inputs(CASES[case]["vocab_size"])
    mask_arg = mask if masked else None
    want = _reference(ref, ids, mask_arg)
    got = ours(ids.numpy(), attention_mask=None if mask_arg is None else mask_arg.numpy())
    assert got[0] is got.last_hidden_state
    assert rel_l2(got.last_hidden_state, want) <= REL_TOL


def test_jit_equals_eager_and_matches_torch_backend() -> None:
    ref = build_reference("gated_gelu")
    ours = _ours(ref, "gated_gelu")
    ids, mask = (jnp.asarray(a.numpy()) for a in inputs(TINY["vocab_size"]))
    eager = ours(ids, attention_mask=mask).last_hidden_state
    traces = []

    @nnx.jit
    def encode(model: T5EncoderModel, i: jax.Array, m: jax.Array) -> Any:
        traces.append(1)
        return model(i, attention_mask=m)

    jitted = encode(ours, ids, mask)
    np.testing.assert_allclose(np.asarray(jitted.last_hidden_state), np.asarray(eager), rtol=1e-5, atol=1e-5)
    encode(ours, ids[::-1], mask[::-1])  # same shapes: no second trace
    assert len(traces) == 1
    torch_ours = torch_models.T5EncoderModel(CASES["gated_gelu"]).eval()
    torch_ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"})
    with torch.no_grad():
        torch_out = torch_ours(torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask)))[0]
    assert rel_l2(eager, torch_out.numpy()) <= REL_TOL


def test_loads_transformers_checkpoint_and_saves_one_transformers_loads(tmp_path: Path) -> None:
    ref = build_reference("relu")
    ref.save_pretrained(tmp_path / "ref", max_shard_size="20KB")  # sharded, as DeepFloyd's encoders
    assert (tmp_path / "ref" / "model.safetensors.index.json").is_file()
    ours = T5EncoderModel.from_pretrained(tmp_path / "ref")
    ids, mask = inputs(TINY["vocab_size"])
    want = _reference(ref, ids, mask)
    assert rel_l2(ours(ids.numpy(), mask.numpy())[0], want) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"] and config["dense_act_fn"] == "relu"
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_array_equal(_reference(back, ids, mask), want)


def test_hub_cache_snapshot_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from tests.pipelines import tiny

    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path / "src" / "text_encoder")
    cache = tmp_path / "cache"
    tiny.hub_cache(cache, "tiny/if", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ours = T5EncoderModel.from_pretrained("tiny/if", subfolder="text_encoder")
    ids, _ = inputs(TINY["vocab_size"])
    assert rel_l2(ours(ids.numpy())[0], _reference(ref, ids, None)) <= REL_TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(tmp_path: Path, dtype: Any) -> None:
    """bf16: every weight bf16; fp16: ``wo`` float32 (transformers' ``_keep_in_fp32_modules``); close to fp32."""
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path)
    ours = T5EncoderModel.from_pretrained(tmp_path, dtype=dtype)
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.kernel.dtype
    assert wo == (jnp.float32 if dtype == jnp.float16 else dtype)
    assert ours.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel.dtype == dtype
    ids, mask = inputs(TINY["vocab_size"])
    got = ours(ids.numpy(), mask.numpy())[0]
    assert got.dtype == dtype
    torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float16
    ref_half = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch_dtype).eval()
    assert rel_l2(got.astype(jnp.float32), _reference(ref_half, ids, mask)) <= 2e-2
    assert rel_l2(got.astype(jnp.float32), _reference(ref, ids, mask)) <= 3e-2


def test_float16_clamp_on_every_array_library() -> None:
    values = [np.inf, -np.inf, 1.0, 60000.0]
    for xp_array in (np.asarray, torch.tensor, jnp.asarray):
        out = np.asarray(clamp_float16(xp_array(np.asarray(values, np.float16))), np.float32)
        np.testing.assert_array_equal(out, [64512.0, -64512.0, 1.0, 60000.0])  # 65504 - 1000, rounded to float16
        finite = np.asarray(clamp_float16(xp_array(np.asarray([65504.0, -3.0], np.float16))), np.float32)
        np.testing.assert_array_equal(finite, [65504.0, -3.0])


def test_bad_inputs_name_the_argument() -> None:
    ours = T5EncoderModel(CASES["relu"])
    with pytest.raises(ValueError, match="input_ids"):
        ours(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(np.ones((1, 2), np.int64), attention_mask=np.ones((1, 3)))
    assert jax.numpy.isfinite(ours(np.ones((1, 2), np.int64))[0]).all()


def test_real_size_t5_v1_1_xxl_names_and_shapes_match_transformers() -> None:
    """DeepFloyd IF's encoder (t5-v1_1-xxl, 4.8B parameters) built without weights in all three libraries."""
    from diffusion_core.flax.models.modeling import torch_shapes

    xxl = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128}
    xxl["feed_forward_proj"] = "gated-gelu"
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**xxl))
        ours_torch = torch_models.T5EncoderModel(xxl)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: tuple(v.shape) for k, v in ours_torch.state_dict().items()} == want
    assert torch_shapes(nnx.eval_shape(lambda: T5EncoderModel(xxl))) == want
    assert 4.7e9 < sum(np.prod(s) for s in want.values()) < 4.8e9
