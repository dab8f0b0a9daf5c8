"""CLIPTokenizer written here vs transformers 5's CLIPTokenizer on the real CLIP vocabulary (ids, decode, files)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import unicodedata

import numpy as np
import pytest

from diffusion_core.tokenizers import CLIPTokenizer
from diffusion_core.tokenizers.text import WHITESPACE
from diffusion_core.weights import hub
from tests.tokenizer_fixtures import random_prompts, write_clip_vocab

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    """vocab.json + merges.txt only (CLIP defaults apply)."""
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def ref(vocab_folder):
    return transformers.CLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77)


@pytest.fixture(scope="module")
def ours(vocab_folder):
    return CLIPTokenizer.from_pretrained(vocab_folder)


def _ref_ids(ref, texts, **kwargs):
    return ref(texts, **kwargs)["input_ids"]


def _first_mismatch(texts, ours_ids, ref_ids):
    for text, a, b in zip(texts, ours_ids, ref_ids, strict=True):
        if list(a) != list(b):
            return f"{text!r}: ours {list(a)} vs transformers {list(b)}"
    return None


def test_ids_match_transformers_on_10k_prompts(ours, ref):
    prompts = random_prompts(10_000, seed=0)
    assert len(set(prompts)) > 9_500
    ours_ids = [ours.encode(p) for p in prompts]
    assert _first_mismatch(prompts, ours_ids, _ref_ids(ref, prompts)) is None
    assert sum(len(i) > 77 for i in ours_ids) > 500  # long prompts are in the mix
    assert len({i for ids in ours_ids for i in ids}) > 3_000  # many distinct tokens exercised


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding="max_length", truncation=True, return_tensors="np"),
        dict(padding="max_length", max_length=20, truncation=True, return_tensors="np"),
        dict(padding="longest", truncation=True, return_tensors="np"),
        dict(padding="longest", max_length=9, truncation=True, return_tensors="np"),
        dict(padding=True, truncation=True),
        dict(padding=False, truncation=True),
        dict(padding=False, max_length=5, truncation=True),
        dict(padding="max_length", max_length=12, truncation=True, add_special_tokens=False, return_tensors="np"),
    ],
)
def test_padding_truncation_match_transformers(ours, ref, kwargs, caplog):
    prompts = random_prompts(300, seed=1)
    with caplog.at_level(logging.ERROR):
        got, want = ours(prompts, **kwargs), ref(prompts, **kwargs)
    for key in ("input_ids", "attention_mask"):
        if kwargs.get("return_tensors") == "np":
            assert got[key].dtype == np.int64 and got[key].shape == want[key].shape
            np.testing.assert_array_equal(got[key], want[key])
        else:
            assert got[key] == want[key]
    single, want_single = ours(prompts[-1], **kwargs), ref(prompts[-1], **kwargs)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(np.asarray(single[key]), np.asarray(want_single[key]))


def _codepoint_strings(codepoints):
    return [f"{c}{c}!{c}a{c}1{c}x {c}'s{c}" for c in map(chr, codepoints)]


def _assigned(step):
    """Code points this Python's Unicode database assigns (not surrogates/private use), every ``step``-th."""
    return [cp for cp in range(0, sys.maxunicode + 1, step) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")]


HARD_CODEPOINTS = [
    *map(ord, WHITESPACE), 0x1C, 0x1D, 0x1E, 0x1F, 0x200B, 0x180E, 0xFEFF, 0x2060, 0x00AD,  # space-like
    0x0301, 0x0345, 0x0483, 0x05B7, 0x064B, 0x093F, 0x0E31, 0x20DD, 0x1D173,  # combining marks
    0x0663, 0x06F1, 0x0967, 0x0E53, 0xFF13, 0x1D7D8, 0x00B2, 0x00BD, 0x2460, 0x216B, 0x3007, 0x10107,  # numbers
    0x0130, 0x0131, 0x01C5, 0x03A3, 0x1E9E, 0x2126, 0x212A, 0xFB01, 0x1F88, 0x10400, 0x1E900,  # casing
    0x1F600, 0x1F3FD, 0x200D, 0xFE0F, 0x1F1EB, 0x2764, 0x00A9, 0x2122,  # emoji and symbols
    0x02B0, 0x3005, 0xA015, 0x1100, 0x11A8, 0xAC00, 0x4E00, 0x20000, 0x30000,  # modifier letters, Hangul, CJK
]  # fmt: skip


def test_unicode_classes_match_transformers(ours, ref):
    """\\p{L}, \\p{N}, \\s, NFC and lower-casing on hard cases and a sample of all assigned code points."""
    codepoints = sorted(set(HARD_CODEPOINTS + _assigned(step=29)))
    texts = _codepoint_strings(codepoints)
    assert _first_mismatch(texts, [ours.encode(t) for t in texts], _ref_ids(ref, texts)) is None


@pytest.mark.slow
def test_every_assigned_codepoint_matches_transformers(ours, ref):
    texts = _codepoint_strings(_assigned(step=1))
    assert _first_mismatch(texts, [ours.encode(t) for t in texts], _ref_ids(ref, texts)) is None


def test_decode_matches_transformers(ours, ref):
    prompts = random_prompts(1_000, seed=2)
    for ids in _ref_ids(ref, prompts):
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    rng = np.random.default_rng(3)
    for _ in range(300):  # arbitrary ids: partial UTF-8 sequences become U+FFFD exactly as transformers does
        ids = rng.integers(0, len(ours), size=int(rng.integers(0, 12))).tolist()
        assert ours.decode(ids) == ref.decode(ids)
    batch = np.asarray(_ref_ids(ref, prompts[:4], padding="max_length", max_length=80))
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)


def test_special_tokens_and_defaults(ours, ref):
    assert ours.model_max_length == 77 and ours.vocab_size == 49408 == len(ours)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    text = "a <|endoftext|>b<|startoftext|> <|ENDOFTEXT|>"
    assert ours.encode(text) == ref(text)["input_ids"]
    # CLIP's published ids (the fixture lays the vocabulary out as CLIP does: "!" is 0, "!</w>" is 256)
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.get_vocab()["!"] == 0 and ours.encode("!") == [49406, 256, 49407]
    assert ours.tokenize("Hello world!!") == ["hello</w>", "world</w>", "!!</w>"]
    assert ours.convert_tokens_to_ids(["hello</w>", "no-such-token"]) == [3306, 49407]


def test_bpe_is_cached(ours):
    ours.bpe._cache.clear()
    first = ours.encode("supercalifragilistic supercalifragilistic")
    assert "supercalifragilistic" in ours.bpe._cache
    assert ours.encode("supercalifragilistic supercalifragilistic") == first


def test_truncation_warns_with_the_dropped_text(ours, caplog):
    prompt = " ".join(["cat"] * 80) + " zebra giraffe"
    with caplog.at_level(logging.WARNING, logger="diffusion_core.tokenizers.clip"):
        out = ours(prompt, padding="max_length", truncation=True, return_tensors="np")
    assert out.input_ids.shape == (1, 77) and out.input_ids[0, -1] == ours.eos_token_id
    message = caplog.records[-1].getMessage()
    assert "77" in message and "zebra giraffe" in message and "cat cat cat cat" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_core.tokenizers.clip"):
        ours("short prompt", padding="max_length", truncation=True)
    assert not caplog.records


def _write_config(folder, config, special_tokens_map=None):
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map), encoding="utf-8")


def _added(content, normalized):
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    return {"content": content, "normalized": normalized, **flags}


SD15_CONFIG = {
    "added_tokens_decoder": {"49406": _added("<|startoftext|>", True), "49407": _added("<|endoftext|>", True)},
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
SD2_CONFIG = {**SD15_CONFIG, "pad_token": "!"}
SD2_CONFIG["added_tokens_decoder"] = {"0": _added("!", False), **SD15_CONFIG["added_tokens_decoder"]}
OLD_DICT_TOKEN = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True}
OLD_CONFIG = {"bos_token": {**OLD_DICT_TOKEN, "content": "<|startoftext|>"}, "eos_token": OLD_DICT_TOKEN}
OLD_CONFIG |= {"model_max_length": 64, "unk_token": OLD_DICT_TOKEN, "name_or_path": "openai/clip-vit-large-patch14"}


@pytest.mark.parametrize(
    "config, special_map",
    [(SD15_CONFIG, None), (SD2_CONFIG, {"pad_token": "!"}), (OLD_CONFIG, {"pad_token": "<|endoftext|>"})],
    ids=["sd15", "sd2_pad_bang", "old_dict_tokens"],
)
def test_configs_match_transformers(vocab_folder, tmp_path, config, special_map):
    folder = shutil.copytree(vocab_folder, tmp_path / "tok")
    _write_config(folder, config, special_map)
    ours, ref = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert (ours.model_max_length, ours.pad_token_id) == (ref.model_max_length, ref.pad_token_id)
    prompts = random_prompts(200, seed=4) + ["hi! <|ENDOFTEXT|> wow!!", "a<|endoftext|>b !", "x ' y 's"]
    kwargs = dict(padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours(prompts, **kwargs).input_ids, ref(prompts, **kwargs).input_ids)
    for ids in ref(prompts[-3:], **kwargs).input_ids:
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_save_pretrained_round_trips_through_transformers(vocab_folder, tmp_path):
    folder = shutil.copytree(vocab_folder, tmp_path / "src")
    _write_config(folder, SD2_CONFIG, {"pad_token": "!"})
    ours = CLIPTokenizer.from_pretrained(folder)
    written = ours.save_pretrained(tmp_path / "saved")
    names = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in written} == names == {p.name for p in (tmp_path / "saved").iterdir()}
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert ref.model_max_length == 77 and ref.pad_token_id == 0 == again.pad_token_id
    prompts = random_prompts(500, seed=5)
    kwargs = dict(padding="max_length", truncation=True, return_tensors="np")
    want = ours(prompts, **kwargs).input_ids
    np.testing.assert_array_equal(again(prompts, **kwargs).input_ids, want)
    np.testing.assert_array_equal(ref(prompts, **kwargs).input_ids, want)
    # saving over a folder transformers 5 wrote drops its tokenizer.json (it would shadow our files)
    ref.save_pretrained(tmp_path / "t5")
    assert (tmp_path / "t5" / "tokenizer.json").is_file()
    ours.save_pretrained(tmp_path / "t5")
    assert not (tmp_path / "t5" / "tokenizer.json").exists()


def test_loads_a_transformers5_saved_folder(ref, ours, tmp_path):
    """transformers 5 saves only tokenizer.json + tokenizer_config.json."""
    ref.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = random_prompts(300, seed=6)
    assert [loaded.encode(p) for p in prompts] == [ours.encode(p) for p in prompts]
    assert loaded.model_max_length == 77 and loaded.pad_token_id == ref.pad_token_id


def test_hub_ids_fetch_only_tokenizer_files(monkeypatch, vocab_folder, tmp_path):
    shutil.copytree(vocab_folder, tmp_path / "tokenizer")
    calls = []

    def fake_download(repo_id, patterns, revision, local_files_only):
        calls.append((repo_id, patterns, revision, local_files_only))
        return tmp_path

    monkeypatch.setattr(hub, "download_snapshot", fake_download)
    tok = CLIPTokenizer.from_pretrained("org/model", subfolder="tokenizer", revision="main", local_files_only=True)
    assert tok.encode("a cat") == [49406, 320, 2368, 49407]
    repo_id, patterns, revision, local_only = calls[0]
    assert (repo_id, revision, local_only) == ("org/model", "main", True)
    assert "tokenizer/vocab.json" in patterns and "tokenizer/merges.txt" in patterns
    assert all(p.startswith("tokenizer/") for p in patterns) and not any("safetensors" in p for p in patterns)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding="maximum"), "padding"),
        (dict(max_length=0), "max_length"),
        (dict(max_length=2.5), "max_length"),
        (dict(max_length=1), "max_length"),
        (dict(truncation="yes"), "truncation"),
        (dict(return_tensors="pt"), "return_tensors"),
    ],
)
def test_bad_call_arguments(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours("a cat", **kwargs)


def test_bad_inputs_raise_clear_errors(ours, vocab_folder, tmp_path):
    with pytest.raises(ValueError, match="text"):
        ours([])
    with pytest.raises(ValueError, match="text"):
        ours(["ok", 3])
    with pytest.raises(ValueError, match="equal length"):
        ours(["a", "a b c"], padding=False, return_tensors="np")
    with pytest.raises(ValueError, match="not a token id"):
        ours.decode([49408])
    with pytest.raises(ValueError, match="1-D"):
        ours.decode([[1, 2]])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="subfolder"):
        CLIPTokenizer.from_pretrained(vocab_folder, subfolder="../x")
    folder = shutil.copytree(vocab_folder, tmp_path / "bad")
    _write_config(folder, {"pad_token": "<|nope|>"})
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.from_pretrained(folder)
    _write_config(folder, {"padding_side": "left"})
    with pytest.raises(ValueError, match="padding_side"):
        CLIPTokenizer.from_pretrained(folder)
    _write_config(folder, {})
    (folder / "merges.txt").write_text("#version: 0.2\nzzzqqq xxxjjj\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.from_pretrained(folder)
