"""Test helper: a tiny T5 ``spiece.model`` folder (DeepFloyd's tokenizer form) trained with sentencepiece."""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = (
    "The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red chair, highly detailed 4k. "
    "Ein Foto von einer Katze. Une photo d'un chat. café naïve résumé 12345 67.89! 東京の写真。"
).split()


def _corpus() -> str:
    rng = random.Random(0)
    lines = [" ".join(_WORDS)] * 3
    for _ in range(400):
        lines.append(" ".join(rng.choice(_WORDS)[: rng.randint(1, 8)] + rng.choice(["", "s", "ing"]) for _ in range(9)))
    return "\n".join(lines)


def write_spiece_folder(root: Path) -> Path:
    """Train a 300-piece unigram model under ``root`` and return ``root/spm``: ``spiece.model``,
    ``tokenizer_config.json`` (T5Tokenizer, 77 tokens, 100 extra ids) and ``special_tokens_map.json``."""
    import sentencepiece

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
    return spm
