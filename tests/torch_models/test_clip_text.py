"""CLIP text encoders vs transformers 5: same state-dict keys, same outputs on random weights."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from diffusion_core.models.text_pooling import eos_token_positions
from diffusion_core.torch.models import CLIPTextModel, CLIPTextModelWithProjection

REL_TOL = 1e-5
SEQ_LEN = 12

# diffusers' tiny text-encoder test config: bos 0, eos 2 (the legacy argmax pooling rule), pad 1.
LEGACY: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "vocab_size": 1000,
    "projection_dim": 16,
}
CASES: dict[str, dict[str, Any]] = {
    "legacy_eos2_quick_gelu": LEGACY,
    # OpenAI-tokenizer style: eos is the last id (like 49407) and also pads; pool the first one.
    "eos_last_id": {**LEGACY, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 999, "hidden_size": 8,
                    "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2},
    # eos in the middle of the vocabulary, so the argmax rule would pick another token.
    "gelu_mid_eos": {**LEGACY, "hidden_act": "gelu", "eos_token_id": 500, "pad_token_id": 0, "hidden_size": 24,
                     "intermediate_size": 20, "num_attention_heads": 3, "layer_norm_eps": 1e-6},
    "gelu_new": {**LEGACY, "hidden_act": "gelu_new", "eos_token_id": 7, "pad_token_id": 7, "num_hidden_layers": 2},
}  # fmt: skip
MODELS = {
    "plain": (transformers.CLIPTextModel, CLIPTextModel),
    "projection": (transformers.CLIPTextModelWithProjection, CLIPTextModelWithProjection),
}


def _build(case: str, kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref_cls, our_cls = MODELS[kind]
    torch.manual_seed(0)
    ref = ref_cls(transformers.CLIPTextConfig(**CASES[case])).eval()
    ours = our_cls(CASES[case]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: dict[str, Any], seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenizer-like rows ``bos, text..., eos, pad...`` of varied lengths, and their padding masks."""
    gen = torch.Generator().manual_seed(1)
    specials = torch.tensor([cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]])
    rows, masks = [], []
    for length in (seq_len, seq_len - 3, 4):
        text = torch.randint(0, cfg["vocab_size"], (length - 2,), generator=gen)
        text[torch.isin(text, specials)] = 3  # 3 is no special token in any case
        pad = [cfg["pad_token_id"]] * (seq_len - length)
        rows.append([cfg["bos_token_id"], *text.tolist(), cfg["eos_token_id"], *pad])
        masks.append([1] * length + [0] * (seq_len - length))
    return torch.tensor(rows), torch.tensor(masks)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_state_dict_keys_match_transformers() -> None:
    for kind in MODELS:
        ref, ours = _build("legacy_eos2_quick_gelu", kind)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert not any("position_ids" in key for key in ours.state_dict())
    _, projection = _build("legacy_eos2_quick_gelu", "projection")
    assert "text_model.embeddings.token_embedding.weight" in projection.state_dict()
    assert "text_projection.weight" in projection.state_dict()


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masking", ["none", "right_padding", "left_padding"])
def test_matches_transformers(case: str, kind: str, masking: str) -> None:
    ref, ours = _build(case, kind)
    input_ids, mask = _inputs(CASES[case])
    if masking == "none":
        mask = None
    elif masking == "left_padding":  # real tokens flush right: padding queries see no key at all
        input_ids, mask = input_ids.flip(-1), mask.flip(-1)
    with torch.no_grad():
        expected = ref(input_ids, attention_mask=mask, output_hidden_states=True)
        got = ours(input_ids, attention_mask=mask, output_hidden_states=True)
    assert len(got.hidden_states) == CASES[case]["num_hidden_layers"] + 1
    for ours_state, ref_state in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert _rel_l2(ours_state, ref_state) <= REL_TOL
    assert _rel_l2(got.last_hidden_state, expected.last_hidden_state) <= REL_TOL
    if kind == "projection":
        assert _rel_l2(got.text_embeds, expected.text_embeds) <= REL_TOL
        with torch.no_grad():
            expected_pooled = ref.text_model(input_ids, attention_mask=mask).pooler_output
    else:
        expected_pooled = expected.pooler_output
    assert _rel_l2(got.pooler_output, expected_pooled) <= REL_TOL


def test_full_length_and_no_hidden_states() -> None:
    ref, ours = _build("eos_last_id", "projection")
    input_ids, mask = _inputs(CASES["eos_last_id"], seq_len=77)
    with torch.no_grad():
        expected, got = ref(input_ids, attention_mask=mask), ours(input_ids, attention_mask=mask)
    assert got.hidden_states is None
    assert _rel_l2(got.text_embeds, expected.text_embeds) <= REL_TOL


def test_pooling_rules() -> None:
    """Legacy eos 2 pools the largest id; any other eos pools its first occurrence."""
    ids = np.array([[0, 900, 5, 500, 500, 1], [0, 7, 500, 999, 500, 500]])
    np.testing.assert_array_equal(eos_token_positions(ids, 2), [1, 3])
    np.testing.assert_array_equal(eos_token_positions(ids, 500), [3, 2])
    torch_positions = eos_token_positions(torch.from_numpy(ids), 500)
    assert isinstance(torch_positions, torch.Tensor)
    np.testing.assert_array_equal(torch_positions.numpy(), [3, 2])
    jnp = pytest.importorskip("jax.numpy")
    np.testing.assert_array_equal(np.asarray(eos_token_positions(jnp.asarray(ids), 500)), [3, 2])
    with pytest.raises(ValueError, match="input_ids"):
        eos_token_positions(ids[0], 500)


def test_config_is_a_complete_dict() -> None:
    ref_config = transformers.CLIPTextConfig(**CASES["gelu_mid_eos"]).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = CLIPTextModel.from_config(ref_config)
    assert isinstance(model.config, Mapping) and dict(model.config) == model.config
    for key, value in model.config.items():
        assert ref_config[key] == value, key
    assert CLIPTextModelWithProjection(LEGACY).config["projection_dim"] == 16
    assert CLIPTextModel().config["vocab_size"] == 49408
    with pytest.warns(UserWarning, match="hiden_size"):
        CLIPTextModel({**LEGACY, "hiden_size": 8})


@pytest.mark.parametrize(
    ("bad_input", "name"),
    [
        (torch.zeros(2, 78, dtype=torch.long), "input_ids"),  # longer than max_position_embeddings
        (torch.zeros(2, 0, dtype=torch.long), "input_ids"),
        (torch.zeros(5, dtype=torch.long), "input_ids"),
        (torch.zeros(2, 5), "input_ids"),  # float ids
        ([[0, 2]], "input_ids"),
        (torch.full((2, 5), 1000), "input_ids"),  # out of the vocabulary
        (torch.full((2, 5), -1), "input_ids"),
    ],
)
def test_bad_input_ids_raise(bad_input: Any, name: str) -> None:
    _, ours = _build("legacy_eos2_quick_gelu", "projection")
    with pytest.raises(ValueError, match=name):
        ours(bad_input)


def test_bad_attention_mask_raises() -> None:
    _, ours = _build("legacy_eos2_quick_gelu", "plain")
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 5, dtype=torch.long), attention_mask=[[1] * 5] * 2)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"hidden_size": 30}, "hidden_size"),  # not a multiple of 4 heads
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
        ({"eos_token_id": None}, "eos_token_id"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 10.0}, "vocab_size"),
        ({"projection_dim": None}, "projection_dim"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
    ],
)
def test_bad_config_raises(overrides: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CLIPTextModelWithProjection({**LEGACY, **overrides})
    with pytest.raises(ValueError, match="config"):
        CLIPTextModel([("hidden_size", 8)])
