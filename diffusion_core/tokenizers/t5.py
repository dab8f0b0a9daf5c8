"""T5's tokenizer (DeepFloyd IF's text encoder): SentencePiece unigram run by well-kept libraries, transformers 5's ids.

Two folder forms are found in the wild: ``spiece.model`` (+ ``tokenizer_config.json`` /
``special_tokens_map.json``), as DeepFloyd ships it, run with the ``sentencepiece`` package; and
``tokenizer.json`` + ``tokenizer_config.json``, as transformers 5 saves it, run with ``tokenizers``
(preferred when both are present, as transformers does). Either way: special tokens (``<pad>``,
``</s>``, ``<unk>``, the sentinels ``<extra_id_N>``, numbered down from the end of the vocabulary) are
split off whole, the rest is SentencePiece-tokenized, ``</s>`` is appended, then truncation and
padding as in ``tokenizers/encoding.py``. Both packages are the ``diffusion_core[t5]`` extra and are
imported only when a folder of their form is loaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from diffusion_core.configuration import config_to_json_string, write_bytes_atomic, write_json_atomic
from diffusion_core.tokenizers.encoding import (
    NO_LIMIT,
    BatchEncoding,
    encode_batch,
    padding_mode,
    split_added,
    text_list,
    token_pattern,
)
from diffusion_core.tokenizers.files import (
    CONFIG_NAME,
    DROPPED_CONFIG_KEYS,
    SPECIAL_TOKENS_MAP_NAME,
    TOKENIZER_JSON_NAME,
    read_tokenizer_config,
    resolve_tokenizer_folder,
)

SPIECE_NAME = "spiece.model"
T5_TOKENIZER_FILES = (SPIECE_NAME, TOKENIZER_JSON_NAME, CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME)
T5_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}  # transformers' defaults
DEFAULT_EXTRA_IDS = 100


def _require(module: str, file_name: str) -> ModuleType:
    """Import ``module`` (an optional dependency) or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"T5Tokenizer needs the {module!r} package to read {file_name}: pip install 'diffusion_core[t5]'"
        ) from e


class _SentencePieceModel:
    """``spiece.model`` run by ``sentencepiece``; special tokens and sentinels are split off here first."""

    file_name = SPIECE_NAME

    def __init__(self, data: bytes, extra_ids: int, special_tokens: Iterable[str]) -> None:
        spm = _require("sentencepiece", SPIECE_NAME)
        self.data = data
        self.processor = spm.SentencePieceProcessor(model_proto=data)
        size = self.processor.get_piece_size()
        self.added = {f"<extra_id_{i}>": size + extra_ids - 1 - i for i in range(extra_ids)}  # transformers' order
        for token in special_tokens:
            token_id = self.processor.piece_to_id(token)
            if self.processor.id_to_piece(token_id) == token:
                self.added[token] = token_id
        self.pattern = token_pattern(self.added)
        self.id_to_added = {i: t for t, i in self.added.items()}
        self.size = size + extra_ids

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.processor.piece_to_id(token)
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, is_added in split_added(text, self.pattern):
            ids.extend([self.added[piece]] if is_added else self.processor.encode(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """Runs of ordinary ids decoded by sentencepiece; special tokens kept as text unless skipped."""
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is not None and i not in self.id_to_added:
                run.append(i)
                continue
            if run:
                parts.append(self.processor.decode(run))
                run = []
            if i is not None and not skip_special_tokens:
                parts.append(self.id_to_added[i])
        return " ".join(p for p in parts if p)

    def save(self, folder: Path) -> Path:
        write_bytes_atomic(folder / SPIECE_NAME, self.data)
        return folder / SPIECE_NAME


class _TokenizerJson:
    """``tokenizer.json`` run by ``tokenizers`` (its own added tokens; its post-processor is not used)."""

    file_name = TOKENIZER_JSON_NAME

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokenizer = _require("tokenizers", TOKENIZER_JSON_NAME).Tokenizer.from_str(text)
        self.tokenizer.no_truncation()  # a file may switch them on; they are applied to the whole batch here
        self.tokenizer.no_padding()
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: Path) -> Path:
        write_json_atomic(folder / TOKENIZER_JSON_NAME, self.text)
        return folder / TOKENIZER_JSON_NAME


def _extra_ids(config: Mapping[str, Any]) -> int:
    """The number of sentinel tokens; other additional special tokens are refused (they would need new ids)."""
    extra_ids = config.get("extra_ids", DEFAULT_EXTRA_IDS)
    if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"tokenizer config: extra_ids must be a non-negative int, got {extra_ids!r}")
    specials = config.get("additional_special_tokens") or []
    other = [t for t in specials if not (isinstance(t, str) and t.startswith("<extra_id_"))]
    if other:
        raise ValueError(
            f"tokenizer config: additional_special_tokens other than <extra_id_N> are not supported: {other}"
        )
    return extra_ids


def _load_model(folder: Path, config: Mapping[str, Any], specials: Mapping[str, str]) -> Any:
    if (folder / TOKENIZER_JSON_NAME).is_file():
        return _TokenizerJson((folder / TOKENIZER_JSON_NAME).read_text(encoding="utf-8"))
    if (folder / SPIECE_NAME).is_file():
        return _SentencePieceModel((folder / SPIECE_NAME).read_bytes(), _extra_ids(config), specials.values())
    raise FileNotFoundError(f"tokenizer: {str(folder)!r} holds neither {SPIECE_NAME} nor {TOKENIZER_JSON_NAME}")


class T5Tokenizer:
    """T5's SentencePiece tokenizer: transformers 5's ``T5Tokenizer`` ids, ``</s>`` appended, right padding."""

    def __init__(self, model: Any, config: Mapping[str, Any]) -> None:
        """``model``: the loaded ``spiece.model`` or ``tokenizer.json``; ``config``: ``tokenizer_config.json``."""
        self.model = model
        self.special_tokens = {key: config.get(key) or default for key, default in T5_SPECIAL_TOKENS.items()}
        for key, token in self.special_tokens.items():
            if model.token_to_id(token) is None:
                raise ValueError(f"{key}: {token!r} is not a token of this {model.file_name}")
        max_length = config.get("model_max_length", NO_LIMIT)
        self.model_max_length = int(max_length) if isinstance(max_length, (int, float)) else NO_LIMIT
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive int, got {max_length!r}")
        for side in ("padding_side", "truncation_side"):
            if config.get(side, "right") != "right":
                raise ValueError(f"tokenizer config: {side} must be 'right', got {config[side]!r}")
        self.config = {k: v for k, v in config.items() if k not in DROPPED_CONFIG_KEYS}

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> T5Tokenizer:
        """Load a transformers T5Tokenizer folder (``spiece.model`` or ``tokenizer.json``) or a Hub repo id."""
        folder = resolve_tokenizer_folder(path_or_repo_id, subfolder, revision, local_files_only, T5_TOKENIZER_FILES)
        config = read_tokenizer_config(folder)
        specials = {key: config.get(key) or default for key, default in T5_SPECIAL_TOKENS.items()}
        return cls(_load_model(folder, config, specials), config)

    def save_pretrained(self, folder: str | os.PathLike) -> list[Path]:
        """Write the model file of the form loaded and ``tokenizer_config.json`` (transformers 5 reads both)."""
        if not isinstance(folder, (str, os.PathLike)):
            raise ValueError(f"folder must be a str or path, got {type(folder).__name__}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (SPIECE_NAME, TOKENIZER_JSON_NAME):  # a stale other form would be read instead
            if name != self.model.file_name and (folder / name).is_file():
                (folder / name).unlink()
        limit = None if self.model_max_length >= NO_LIMIT else self.model_max_length
        config = {**self.config, **self.special_tokens, "model_max_length": limit, "tokenizer_class": "T5Tokenizer"}
        write_json_atomic(
            folder / CONFIG_NAME, config_to_json_string({k: v for k, v in config.items() if v is not None})
        )
        return [self.model.save(folder), folder / CONFIG_NAME]

    def _token_id(self, key: str) -> int:
        return self.model.token_to_id(self.special_tokens[key])

    @property
    def eos_token_id(self) -> int:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int:
        return self._token_id("pad_token")

    @property
    def unk_token_id(self) -> int:
        return self._token_id("unk_token")

    def __len__(self) -> int:
        """Vocabulary size with the sentinel and special tokens, as ``len()`` of transformers' tokenizer."""
        return self.model.size

    def _text_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str or a list of str, got an item of type {type(text).__name__}")
        return self.model.encode(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, ``</s>`` appended (no truncation, no padding)."""
        ids = self._text_ids(text)
        return [*ids, self.eos_token_id] if add_special_tokens else ids

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

        ``max_length`` defaults to ``model_max_length``; truncation keeps the final ``</s>``.
        """
        mode = padding_mode(padding, max_length, truncation, return_tensors, self.pad_token_id)
        texts, single = text_list(text)
        return encode_batch(
            texts,
            single,
            text_ids=self._text_ids,
            wrap=(lambda ids: [*ids, self.eos_token_id]) if add_special_tokens else list,
            num_special=1 if add_special_tokens else 0,
            truncate=(lambda ids, room, _limit: ids[:room]) if truncation else None,
            limit=max_length if max_length is not None else self.model_max_length,
            mode=mode,
            pad_token_id=self.pad_token_id,
            return_tensors=return_tensors,
        )

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (sentencepiece's or tokenizers' decoder)."""
        flat = np.asarray(ids)
        if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got shape {flat.shape} of {flat.dtype}")
        if flat.size and not (0 <= flat.min() and flat.max() < len(self)):
            raise ValueError(f"ids: token ids must lie in [0, {len(self)})")
        return self.model.decode([int(i) for i in flat], skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Sequence[int]] | np.ndarray, **kwargs: Any) -> list[str]:
        """:meth:`decode` of each row."""
        return [self.decode(row, **kwargs) for row in sequences]

    def __repr__(self) -> str:
        return f"T5Tokenizer(file={self.model.file_name}, size={len(self)}, model_max_length={self.model_max_length})"


T5TokenizerFast = T5Tokenizer  # transformers 5 has one T5 tokenizer; older model_index.json files name the fast one
