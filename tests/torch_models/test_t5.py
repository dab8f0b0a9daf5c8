"""T5 encoder vs transformers 5: same state-dict keys, same outputs, checkpoints that load both ways."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffusion_core.models.t5_config import relative_position_buckets, t5_encoder_config
from diffusion_core.torch.models import T5EncoderModel

REL_TOL = 1e-5
SEQ_LEN = 11

# Tiny T5 configs: T5 v1.1 / DeepFloyd IF (gated-gelu) and original T5 (relu); d_model != heads * d_kv.
TINY: dict[str, Any] = {
    "vocab_size": 99,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 3,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 12,
    "dropout_rate": 0.0,
}
CASES: dict[str, dict[str, Any]] = {
    "gated_gelu": {**TINY, "feed_forward_proj": "gated-gelu"},
    "relu": {**TINY, "feed_forward_proj": "relu", "d_kv": 6, "num_heads": 3, "layer_norm_epsilon": 1e-5},
    "gated_silu": {**TINY, "feed_forward_proj": "gated-silu", "num_layers": 2},
}


def build_reference(case: str, seed: int = 0) -> transformers.T5EncoderModel:
    """A transformers T5 encoder with every weight random (norm scales included)."""
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**CASES[case])).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "layer_norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return ref


def inputs(vocab_size: int, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``text..., </s>, <pad>...`` of varied lengths (eos 1, pad 0, as the T5 tokenizer) and masks."""
    gen = torch.Generator().manual_seed(1)
    rows, masks = [], []
    for length in (seq_len, seq_len - 4, 2):
        text = torch.randint(2, vocab_size, (length - 1,), generator=gen)
        rows.append([*text.tolist(), 1, *[0] * (seq_len - length)])
        masks.append([1] * length + [0] * (seq_len - length))
    return torch.tensor(rows), torch.tensor(masks)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def _ours(ref: transformers.T5EncoderModel, case: str) -> T5EncoderModel:
    ours = T5EncoderModel(CASES[case]).eval()
    state = {k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    ours.load_state_dict(state, strict=True)
    return ours


def test_state_dict_keys_are_transformers_saved_keys(tmp_path: Path) -> None:
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(T5EncoderModel(CASES["gated_gelu"]).state_dict()) == sorted(saved)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_matches_transformers(case: str, masked: bool) -> None:
    ref = build_reference(case)
    ours = _ours(ref, case)
    ids, mask = inputs(CASES[case]["vocab_size"])
    mask_arg = mask if masked else None
    with torch.no_grad():
        want = ref(ids, attention_mask=mask_arg).last_hidden_state
        got = ours(ids, attention_mask=mask_arg)
    assert float(want.std()) > 0.1  # a degenerate reference would make the comparison empty
    assert got[0] is got.last_hidden_state
    assert got.last_hidden_state.shape == want.shape
    assert rel_l2(got.last_hidden_state, want) <= REL_TOL
    if masked:  # the real tokens do not depend on what the padding holds
        with torch.no_grad():
            other = ours(torch.where(mask.bool(), ids, 5), attention_mask=mask).last_hidden_state
        real = mask.bool()
        assert torch.allclose(other[real], got.last_hidden_state[real], atol=1e-5)


@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 12), (6, 20), (33, 64)])
def test_relative_position_buckets_match_transformers(buckets: int, distance: int) -> None:
    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    attention = transformers.models.t5.modeling_t5.T5Attention
    want = attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets, max_distance=distance)
    got = relative_position_buckets(length, length, buckets, distance)
    np.testing.assert_array_equal(got, want.numpy())
    want_causal = attention._relative_position_bucket(relative, False, buckets, distance)
    np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance, False), want_causal)


def test_loads_transformers_checkpoint_and_saves_one_transformers_loads(tmp_path: Path) -> None:
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path / "ref")
    ours = T5EncoderModel.from_pretrained(tmp_path / "ref")
    ids, mask = inputs(TINY["vocab_size"])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert rel_l2(ours(ids, attention_mask=mask).last_hidden_state, want) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"] and config["model_type"] == "t5"
    assert config["use_cache"] is False and config["is_gated_act"] is True and config["dense_act_fn"] == "gelu_new"
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=mask).last_hidden_state, want)


def test_sharded_checkpoint_with_both_embedding_names(tmp_path: Path) -> None:
    """DeepFloyd IF's text encoders are sharded and may hold the tied embedding under both names."""
    ref = build_reference("relu")
    ref.save_pretrained(tmp_path / "ref", max_shard_size="20KB")
    assert (tmp_path / "ref" / "model.safetensors.index.json").is_file()
    ours = T5EncoderModel.from_pretrained(tmp_path / "ref")
    ids, mask = inputs(TINY["vocab_size"])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert rel_l2(ours(ids, attention_mask=mask)[0], want) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 1
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # shared.weight and encoder.embed_tokens.weight
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)  # a full T5's decoder is ignored
    (tmp_path / "both").mkdir()
    save_file(state, tmp_path / "both" / "model.safetensors")
    (tmp_path / "both" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    with torch.no_grad():
        assert rel_l2(T5EncoderModel.from_pretrained(tmp_path / "both")(ids, mask)[0], want) <= REL_TOL


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
    with torch.no_grad():
        assert rel_l2(ours(ids)[0], ref(ids).last_hidden_state) <= REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_transformers(tmp_path: Path, dtype: torch.dtype) -> None:
    """bf16: every weight bf16; fp16: ``wo`` kept float32 (transformers' ``_keep_in_fp32_modules``)."""
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path)
    ref_half = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=dtype).eval()
    ours = T5EncoderModel.from_pretrained(tmp_path, dtype=dtype)
    ref_state = ref_half.state_dict()
    for name, got in ours.state_dict().items():
        assert got.dtype == ref_state[name].dtype, name
    assert ours.dtype == dtype
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == (torch.float32 if dtype == torch.float16 else dtype)
    ids, mask = inputs(TINY["vocab_size"])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)[0]
        want = ref_half(ids, attention_mask=mask).last_hidden_state
        full = ref(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == want.dtype == dtype
    assert rel_l2(got, want) <= 1e-2  # same math in half precision: rounding-level differences only
    assert rel_l2(got, full) <= 3e-2  # and close to the float32 result


def test_deepfloyd_style_config_loads_quietly_and_round_trips(tmp_path: Path) -> None:
    """The keys of DeepFloyd IF's text_encoder/config.json (t5-v1_1-xxl, written by transformers 4), tiny sizes."""
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path / "if")
    config = {
        "architectures": ["T5EncoderModel"], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
        "num_decoder_layers": 3, "output_past": True, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.21.0.dev0", "use_cache": True,
        **{k: TINY[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
        **{k: TINY[k] for k in ("relative_attention_num_buckets", "relative_attention_max_distance")},
    }  # fmt: skip
    (tmp_path / "if" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = T5EncoderModel.from_pretrained(tmp_path / "if")
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["decoder_start_token_id"] == 0 and saved["output_past"] is True
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "ours").eval()
    ids, mask = inputs(TINY["vocab_size"])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(back(ids, attention_mask=mask).last_hidden_state, want)
        assert rel_l2(ours(ids, attention_mask=mask)[0], want) <= REL_TOL


def test_config_checks() -> None:
    cfg = t5_encoder_config({"feed_forward_proj": "gated-gelu", "architectures": ["T5EncoderModel"]})
    assert cfg["dense_act_fn"] == "gelu_new" and cfg["is_gated_act"] and cfg["num_decoder_layers"] == 6
    for bad, match in [
        ({"feed_forward_proj": "gelu-gated"}, "feed_forward_proj"),
        ({"feed_forward_proj": "gated-tanh"}, "dense_act_fn"),
        ({"d_model": 0}, "d_model"),
        ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon"),
    ]:
        with pytest.raises(ValueError, match=match):
            T5EncoderModel(bad)
    with pytest.warns(UserWarning, match="unknown keys"):
        t5_encoder_config({"not_a_t5_key": 1})
    model = T5EncoderModel(CASES["relu"])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids: token ids"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="sequence length 0 must be at least 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2]]))[0].sum()))


def test_t5_layout_rules() -> None:
    """Tied names load once, a full T5's decoder is ignored, ``wo`` stays float32 only in float16."""
    from diffusion_core.weights.pretrained import T5_ENCODER_LAYOUT as layout

    items = [("encoder.embed_tokens.weight", 1), ("shared.weight", 2), ("decoder.final_layer_norm.weight", 3)]
    assert list(layout.rename(items)) == [("shared.weight", 1)]
    assert list(layout.rename([("lm_head.weight", 0), ("encoder.final_layer_norm.weight", 4)])) == [
        ("encoder.final_layer_norm.weight", 4)
    ]
    with pytest.raises(ValueError, match="name the same weight"):
        list(layout.rename([("encoder.block.0.layer.0.SelfAttention.q.weight", 0)] * 2))
    wo = "encoder.block.3.layer.1.DenseReluDense.wo.weight"
    assert layout.weight_dtype(wo, "float16") == "float32"
    assert layout.weight_dtype(wo, "bfloat16") == "bfloat16"
    assert layout.weight_dtype("encoder.block.3.layer.1.DenseReluDense.wi_0.weight", "float16") == "float16"


def test_fp16_variant_shards_as_deepfloyd_ships_them(tmp_path: Path) -> None:
    """``text_encoder/model.fp16-0000i-of-0000n.safetensors`` + ``model.safetensors.index.fp16.json``."""
    ref = build_reference("gated_gelu")
    ref.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.fp16.json").is_file()
    ours = T5EncoderModel.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    ref_half = transformers.T5EncoderModel.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16).eval()
    ids, mask = inputs(TINY["vocab_size"])
    with torch.no_grad():
        got, want = ours(ids, mask)[0], ref_half(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == want.dtype == torch.float16
    assert rel_l2(got, want) <= 1e-2
