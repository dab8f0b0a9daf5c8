"""T5 tokenizer vs transformers 5's T5Tokenizer, in both folder forms: ``spiece.model`` and ``tokenizer.json``."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from diffusion_core.pipelines.components import backend_component_table
from diffusion_core.tokenizers import T5Tokenizer

pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

_WORDS = (
    "The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red chair, highly detailed 4k. "
    "Ein Foto von einer Katze. Une photo d'un chat. café naïve résumé 12345 67.89! 東京の写真。"
).split()
STRINGS = [
    "a photo of a cat",
    "",
    " ",
    "  leading, trailing  and  double  spaces ",
    "Café NAÏVE résumé",
    "東京の写真 🙂 unknown ☃ glyphs",
    "tab\tnew\nline\r\nend",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "<extra_id_0> sentinel <extra_id_99>x<extra_id_7>",
    "</s> eos, <pad> pad and <unk> unk in the text",
    "An astronaut riding a horse on the moon, trending on artstation. " * 12,  # longer than 77 tokens
]


def _corpus() -> str:
    rng = random.Random(0)
    lines = [" ".join(_WORDS)] * 3
    for _ in range(400):
        lines.append(" ".join(rng.choice(_WORDS)[: rng.randint(1, 8)] + rng.choice(["", "s", "ing"]) for _ in range(9)))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained ``spiece.model`` folder (DeepFloyd's form) and its transformers 5 save (``tokenizer.json``)."""
    import sentencepiece

    root = tmp_path_factory.mktemp("t5_tokenizer")
    (root / "corpus.txt").write_text(_corpus(), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=300, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    spm = root / "spm"
    spm.mkdir()
    (spm / "spiece.model").write_bytes((root / "sp.model").read_bytes())
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 77, "extra_ids": 100}
    (spm / "tokenizer_config.json").write_text(json.dumps(config))
    (spm / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    transformers.T5Tokenizer.from_pretrained(spm).save_pretrained(root / "json")
    data = json.loads((root / "json" / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    (root / "json" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")  # ignored, as transformers
    assert sorted(p.name for p in (root / "json").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return {"spiece": spm, "tokenizer_json": root / "json"}


@pytest.mark.parametrize("form", ["spiece", "tokenizer_json"])
def test_ids_match_transformers(folders: dict[str, Path], form: str) -> None:
    ref = transformers.T5Tokenizer.from_pretrained(folders[form])
    ours = T5Tokenizer.from_pretrained(folders[form])
    assert len(ours) == len(ref) and ours.model_max_length == ref.model_max_length == 77
    assert (ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 0, 2)
    for text in STRINGS:
        assert ours(text, truncation=False).input_ids == ref(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
    assert ours("<extra_id_0>").input_ids == [len(ref) - 1, 1]  # sentinels count down from the top


@pytest.mark.parametrize("form", ["spiece", "tokenizer_json"])
def test_padded_truncated_batch_matches_transformers(folders: dict[str, Path], form: str) -> None:
    """DeepFloyd IF's call: padding to 77, truncation keeping ``</s>``, attention mask."""
    ref = transformers.T5Tokenizer.from_pretrained(folders[form])
    ours = T5Tokenizer.from_pretrained(folders[form])
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True, "add_special_tokens": True}
    want = ref(STRINGS, return_tensors="np", **kwargs)
    got = ours(STRINGS, return_tensors="np", **kwargs)
    assert got.input_ids.shape == (len(STRINGS), 77) and got.input_ids.dtype == np.int64
    np.testing.assert_array_equal(got.input_ids, want["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])
    assert got.input_ids[-1, -1] == ours.eos_token_id  # the long prompt was cut and still ends with </s>
    short = ours(["a cat", "a photo of a dog"], padding="longest")
    assert short.input_ids == ref(["a cat", "a photo of a dog"], padding="longest").input_ids


@pytest.mark.parametrize("form", ["spiece", "tokenizer_json"])
def test_decode_matches_transformers(folders: dict[str, Path], form: str) -> None:
    ref = transformers.T5Tokenizer.from_pretrained(folders[form])
    ours = T5Tokenizer.from_pretrained(folders[form])
    for text in ["a photo of a cat", "Café résumé 12345", "quick brown fox, lazy dog."]:
        ids = ours(text, padding="max_length", max_length=16).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="ids"):
        ours.decode([len(ours)])


@pytest.mark.parametrize("form", ["spiece", "tokenizer_json"])
def test_save_then_transformers_and_ours_load(folders: dict[str, Path], form: str, tmp_path: Path) -> None:
    ours = T5Tokenizer.from_pretrained(folders[form])
    (tmp_path / ("tokenizer.json" if form == "spiece" else "spiece.model")).write_text("stale other form")
    written = ours.save_pretrained(tmp_path)
    assert {p.name for p in written} == {ours.model.file_name, "tokenizer_config.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    ref = transformers.T5Tokenizer.from_pretrained(tmp_path)
    again = T5Tokenizer.from_pretrained(tmp_path)
    assert ref.model_max_length == again.model_max_length == 77
    for text in STRINGS:
        assert again(text, truncation=False).input_ids == ref(text).input_ids == ours.encode(text)


def test_hub_cache_snapshot_loads_offline(folders: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    from tests.pipelines import tiny

    shutil.copytree(folders["spiece"], tmp_path / "src" / "tokenizer")
    cache = tmp_path / "cache"
    tiny.hub_cache(cache, "tiny/if", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ours = T5Tokenizer.from_pretrained("tiny/if", subfolder="tokenizer")
    assert (
        ours("a photo of a cat").input_ids
        == T5Tokenizer.from_pretrained(folders["spiece"])("a photo of a cat").input_ids
    )


def test_missing_package_names_the_extra(folders: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"diffusion_core\[t5\]"):
        T5Tokenizer.from_pretrained(folders["spiece"])
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"'tokenizers' package .*diffusion_core\[t5\]"):
        T5Tokenizer.from_pretrained(folders["tokenizer_json"])


def test_bad_inputs_and_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    ours = T5Tokenizer.from_pretrained(folders["spiece"])
    with pytest.raises(ValueError, match="padding"):
        ours("a", padding="left")
    with pytest.raises(ValueError, match="text"):
        ours([])
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="pt")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes((folders["spiece"] / "spiece.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos-not-in-vocab>"}))
    with pytest.raises(ValueError, match="eos_token"):
        T5Tokenizer.from_pretrained(tmp_path)


def test_pipeline_component_table_knows_t5() -> None:
    table = backend_component_table("diffusion_core.torch.models")
    assert table["T5Tokenizer"].kind == table["T5TokenizerFast"].kind == "tokenizer"
    assert table["T5EncoderModel"].library == "transformers"


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_if_style_text_conditioning_from_a_pipeline_folder(
    folders: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    """Tokenizer and text encoder loaded as pipeline components, called as DeepFloyd IF calls them."""
    import torch

    from diffusion_core.pipelines.components import load_component
    from tests.torch_models.test_t5 import CASES, rel_l2

    config = {**CASES["gated_gelu"], "vocab_size": len(transformers.T5Tokenizer.from_pretrained(folders["spiece"]))}
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**config)).eval()  # random weights, unit norm scales
    ref.save_pretrained(tmp_path / "text_encoder")
    shutil.copytree(folders["spiece"], tmp_path / "tokenizer")
    table = backend_component_table(f"diffusion_core.{backend}.models")
    tokenizer = load_component(table["T5Tokenizer"], tmp_path, "tokenizer")
    text_encoder = load_component(table["T5EncoderModel"], tmp_path, "text_encoder")
    prompts = ["a photo of a cat", "An astronaut riding a horse on the moon " * 20]
    enc = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    ids, mask = enc.input_ids, enc.attention_mask
    if backend == "torch":
        with torch.no_grad():
            got = text_encoder(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
    else:
        got = np.asarray(text_encoder(ids, attention_mask=mask)[0])
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert got.shape == (2, 77, 32)
    assert rel_l2(torch.tensor(got), want) <= (1e-5 if backend == "torch" else 1e-4)
