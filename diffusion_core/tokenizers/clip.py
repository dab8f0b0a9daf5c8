"""CLIP's tokenizer, written here: loads transformers' CLIPTokenizer folders and gives the same token ids.

Text -> special/added tokens split off -> NFC + lower-casing -> CLIP pre-tokenizer -> byte-level BPE ->
``<|startoftext|> ... <|endoftext|>`` -> truncation (with a warning quoting what was dropped) -> padding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.tokenizers.bpe import ByteLevelBPE
from diffusion_core.tokenizers.encoding import (
    BatchEncoding,
    encode_batch,
    padding_mode,
    split_added,
    text_list,
    token_pattern,
)
from diffusion_core.tokenizers.files import (
    DROPPED_CONFIG_KEYS,
    SPECIAL_TOKEN_KEYS,
    AddedToken,
    TokenizerFiles,
    read_tokenizer_files,
    resolve_tokenizer_folder,
    write_tokenizer_files,
)
from diffusion_core.tokenizers.text import normalize, pre_tokenize

logger = logging.getLogger(__name__)

CLIP_MODEL_MAX_LENGTH = 77


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP text encoders (transformers' ``CLIPTokenizer`` vocabulary and files)."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        model_max_length: int = CLIP_MODEL_MAX_LENGTH,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str | None = "<|endoftext|>",
        pad_token: str | None = "<|endoftext|>",
        added_tokens: Sequence[AddedToken] = (),
        clean_up_tokenization_spaces: bool = False,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2, got {model_max_length!r}")
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.extra_config = {k: v for k, v in (extra_config or {}).items() if k not in DROPPED_CONFIG_KEYS}
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
        self.special_tokens["pad_token"] = pad_token
        self.added_tokens = self._with_special_tokens(dict(vocab), list(added_tokens))
        added_ids = {t.content: t.id for t in self.added_tokens}
        unk_id = None if unk_token is None else added_ids.get(unk_token, vocab.get(unk_token))
        self.bpe = ByteLevelBPE(vocab, merges, unk_id)
        self._id_to_token = {i: t for t, i in vocab.items()} | {t.id: t.content for t in self.added_tokens}
        self._added_ids = added_ids
        self._special_ids = {t.id for t in self.added_tokens if t.special}
        self._raw_pattern = token_pattern(t.content for t in self.added_tokens if not t.normalized)
        self._normalized_pattern = token_pattern(normalize(t.content) for t in self.added_tokens if t.normalized)
        self._normalized_ids = {normalize(t.content): t.id for t in self.added_tokens if t.normalized}

    def _with_special_tokens(self, vocab: dict[str, int], added: list[AddedToken]) -> list[AddedToken]:
        """Added tokens plus every special token (as transformers does); each must have an id."""
        known = {t.content for t in added}
        for key, content in self.special_tokens.items():
            if content is None or content in known:
                continue
            if content not in vocab:
                raise ValueError(f"{key}: {content!r} is neither in the vocabulary nor an added token")
            added.append(AddedToken(content, vocab[content], special=True, normalized=False))
            known.add(content)
        for key in ("bos_token", "eos_token"):
            if self.special_tokens[key] is None:
                raise ValueError(f"{key} must be a token string, got None")
        return added

    # ----------------------------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> CLIPTokenizer:
        """Load a transformers CLIPTokenizer folder (or a Hub repo id, e.g. ``subfolder="tokenizer"``)."""
        folder = resolve_tokenizer_folder(path_or_repo_id, subfolder, revision, local_files_only)
        files = read_tokenizer_files(folder)
        config = files.config
        for side in ("padding_side", "truncation_side"):
            if config.get(side, "right") != "right":
                raise ValueError(f"tokenizer config: {side} must be 'right', got {config[side]!r}")
        max_length = config.get("model_max_length", CLIP_MODEL_MAX_LENGTH)
        max_length = int(max_length) if isinstance(max_length, (int, float)) else CLIP_MODEL_MAX_LENGTH
        specials = {key: config[key] for key in SPECIAL_TOKEN_KEYS if key in config and config[key] is not None}
        extra = {k: v for k, v in config.items() if k not in (*SPECIAL_TOKEN_KEYS, "model_max_length")}
        return cls(
            files.vocab,
            files.merges,
            model_max_length=max_length,
            added_tokens=files.added_tokens,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            extra_config=extra,
            **specials,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> list[Path]:
        """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (transformers reads them)."""
        if not isinstance(folder, (str, os.PathLike)):
            raise ValueError(f"folder must be a str or path, got {type(folder).__name__}")
        config = {
            **self.extra_config,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        }
        merges = sorted(self.bpe.ranks, key=self.bpe.ranks.__getitem__)
        return write_tokenizer_files(Path(folder), TokenizerFiles(self.bpe.vocab, merges, config, self.added_tokens))

    # ---------------------------------------------------------------------------------------- vocabulary
    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens[key]
        return None if token is None else self._added_ids.get(token, self.bpe.vocab.get(token))

    @property
    def bos_token_id(self) -> int:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary (added tokens not counted), as in transformers."""
        return len(self.bpe.vocab)

    def __len__(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return {**self.bpe.vocab, **self._added_ids}

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        tokens = []
        for i in ids:
            token = self._id_to_token.get(int(i))
            if token is None:
                raise ValueError(f"ids: {int(i)} is not a token id (valid ids: 0..{max(self._id_to_token)})")
            tokens.append(token)
        return tokens

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        vocab = self.get_vocab()
        return [vocab.get(t, self.unk_token_id) for t in tokens]

    # ------------------------------------------------------------------------------------------ encoding
    def _encode_normalized(self, text: str, ids: list[int]) -> None:
        for piece, is_added in split_added(normalize(text), self._normalized_pattern):
            if is_added:
                ids.append(self._normalized_ids[piece])
                continue
            for word in pre_tokenize(piece):
                ids.extend(self.bpe.word_to_ids(word))

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str or a list of str, got an item of type {type(text).__name__}")
        ids: list[int] = []
        for piece, is_added in split_added(text, self._raw_pattern):
            if is_added:
                ids.append(self._added_ids[piece])
            else:
                self._encode_normalized(piece, ids)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` (no BOS/EOS)."""
        return self.convert_ids_to_tokens(self._text_ids(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text: ``[bos, ..., eos]`` (no truncation, no padding)."""
        ids = self._text_ids(text)
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def _truncate(self, ids: list[int], room: int, max_length: int) -> list[int]:
        """The first ``room`` ids, logging the text dropped."""
        logger.warning(
            "The following part of your input was truncated because the tokenizer handles at most %d tokens: %r",
            max_length,
            self.decode(ids[room:]),
        )
        return ids[:room]

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """``input_ids`` and ``attention_mask`` (lists, or int64 arrays of shape (batch, length) for ``"np"``).

        ``max_length`` defaults to ``model_max_length``; truncation keeps BOS/EOS and logs the dropped text.
        """
        mode = padding_mode(padding, max_length, truncation, return_tensors, self.pad_token_id)
        texts, single = text_list(text)
        limit = max_length if max_length is not None else self.model_max_length
        return encode_batch(
            texts,
            single,
            text_ids=self._text_ids,
            wrap=(lambda ids: [self.bos_token_id, *ids, self.eos_token_id]) if add_special_tokens else list,
            num_special=2 if add_special_tokens else 0,
            truncate=self._truncate if truncation else None,
            limit=limit,
            mode=mode,
            pad_token_id=self.pad_token_id,
            return_tensors=return_tensors,
        )

    # ------------------------------------------------------------------------------------------ decoding
    def decode(
        self,
        ids: Sequence[int] | np.ndarray,
        skip_special_tokens: bool = False,
    ) -> str:
        """Token ids -> text: BPE undone byte-exactly, ``</w>`` read as a space, ends stripped.

        Like transformers 5, ``clean_up_tokenization_spaces`` from the config is kept but not applied to
        byte-level BPE output (it would delete real spaces before punctuation).
        """
        flat = np.asarray(ids)
        if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got shape {flat.shape} of {flat.dtype}")
        kept = [int(i) for i in flat if not (skip_special_tokens and int(i) in self._special_ids)]
        raw = self.bpe.decode_bytes(self.convert_ids_to_tokens(kept))
        return raw.decode("utf-8", errors="replace").replace(self.bpe.suffix, " ").strip()

    def batch_decode(self, sequences: Iterable[Sequence[int]] | np.ndarray, **kwargs: Any) -> list[str]:
        """:meth:`decode` of each row."""
        return [self.decode(row, **kwargs) for row in sequences]

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"special_tokens={self.special_tokens})"
        )
