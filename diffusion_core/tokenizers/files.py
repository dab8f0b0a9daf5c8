"""Tokenizer folders in transformers' layout: find them (local or Hub), read and write their files.

Read: ``vocab.json`` + ``merges.txt`` (or, as transformers 5 saves, ``tokenizer.json``), plus the optional
``tokenizer_config.json`` / ``special_tokens_map.json``. Write: the four files every transformers version
reads, each one atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_core.configuration import config_to_json_string, write_json_atomic
from diffusion_core.weights.hub import resolve_folder

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"
TOKENIZER_JSON_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
TOKENIZER_FILES = (VOCAB_NAME, MERGES_NAME, TOKENIZER_JSON_NAME, CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json keys that describe where a folder came from, or that the writer fills in itself.
DROPPED_CONFIG_KEYS = frozenset(
    {
        "added_tokens_decoder",
        "tokenizer_file",
        "special_tokens_map_file",
        "name_or_path",
        "is_local",
        "local_files_only",
    }
)


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole before BPE (``normalized``: matched in the lower-cased text, else the raw text)."""

    content: str
    id: int
    special: bool = True
    normalized: bool = False


@dataclass
class TokenizerFiles:
    """Everything read from a tokenizer folder."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    config: dict[str, Any] = field(default_factory=dict)
    added_tokens: list[AddedToken] = field(default_factory=list)


def resolve_tokenizer_folder(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None,
    revision: str | None,
    local_files_only: bool,
    names: tuple[str, ...] = TOKENIZER_FILES,
) -> Path:
    """A local folder, or the Hub snapshot of the tokenizer files ``names`` of ``subfolder`` (nothing else)."""
    if subfolder is not None and not isinstance(subfolder, str):
        raise ValueError(f"subfolder must be a relative folder name, got {subfolder!r}")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return resolve_folder(
        path_or_repo_id,
        [prefix + name for name in names],
        subfolder=subfolder,
        revision=revision,
        local_files_only=local_files_only,
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer: {str(path)!r} is not valid JSON ({e})") from e


def _token_content(value: Any, key: str) -> str | None:
    """A special token given as a string or as transformers' ``{"content": ...}`` dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer config: {key} must be a string or a dict with 'content', got {value!r}")


def _added_token(content: str, token_id: int, spec: dict[str, Any], source: str) -> AddedToken:
    for flag in ("lstrip", "rstrip", "single_word"):
        if spec.get(flag):
            raise ValueError(f"{source}: added token {content!r} sets {flag}=true, which is not supported")
    special = bool(spec.get("special", False))
    return AddedToken(content, int(token_id), special, bool(spec.get("normalized", not special)))


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[AddedToken]]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"tokenizer: {str(path)!r} does not hold a BPE model with a vocab")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"tokenizer: {str(path)!r} has a merge that is not a pair of symbols")
    added = [_added_token(t["content"], t["id"], t, str(path)) for t in data.get("added_tokens") or []]
    return dict(model["vocab"]), merges, added


def read_tokenizer_files(folder: Path) -> TokenizerFiles:
    """Read vocabulary, merges, config and added tokens from ``folder``."""
    from diffusion_core.tokenizers.bpe import parse_merges

    vocab_path, merges_path, json_path = folder / VOCAB_NAME, folder / MERGES_NAME, folder / TOKENIZER_JSON_NAME
    added: list[AddedToken] = []
    if vocab_path.is_file() and merges_path.is_file():
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"tokenizer: {str(vocab_path)!r} must map token strings to integer ids")
        merges = parse_merges(merges_path.read_text(encoding="utf-8").split("\n"))
    elif json_path.is_file():
        vocab, merges, added = _read_tokenizer_json(json_path)
    else:
        raise FileNotFoundError(
            f"tokenizer: {str(folder)!r} holds neither {VOCAB_NAME} + {MERGES_NAME} nor {TOKENIZER_JSON_NAME}"
        )
    config = read_tokenizer_config(folder)
    for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
        added.append(_added_token(spec["content"], int(token_id), spec, CONFIG_NAME))
    return TokenizerFiles(vocab, merges, config, added)


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` (or ``{}``) completed from ``special_tokens_map.json``; special tokens as strings."""
    config: dict[str, Any] = {}
    if (folder / CONFIG_NAME).is_file():
        config = _read_json(folder / CONFIG_NAME)
        if not isinstance(config, dict):
            raise ValueError(f"tokenizer: {str(folder / CONFIG_NAME)!r} must hold a JSON object")
    if (folder / SPECIAL_TOKENS_MAP_NAME).is_file():
        special_map = _read_json(folder / SPECIAL_TOKENS_MAP_NAME)
        for key in SPECIAL_TOKEN_KEYS:  # tokenizer_config.json wins, as in transformers
            if config.get(key) is None and isinstance(special_map, dict) and special_map.get(key) is not None:
                config[key] = special_map[key]
    for key in SPECIAL_TOKEN_KEYS:
        config[key] = _token_content(config.get(key), key)
    return config


def write_tokenizer_files(folder: Path, files: TokenizerFiles) -> list[Path]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (each atomically).

    A stale ``tokenizer.json`` in ``folder`` is removed: transformers would prefer it over the files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(files.vocab, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in files.merges)
    flags = {"lstrip": False, "rstrip": False, "single_word": False}
    decoder = {
        str(t.id): {"content": t.content, **flags, "normalized": t.normalized, "special": t.special}
        for t in sorted(files.added_tokens, key=lambda t: t.id)
    }
    config = {**files.config, "added_tokens_decoder": decoder}
    special_map = {key: config[key] for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    stale = folder / TOKENIZER_JSON_NAME  # transformers would read it instead of the files written here
    if stale.is_file():
        stale.unlink()
    written = []
    for name, text in (
        (VOCAB_NAME, vocab_text),
        (MERGES_NAME, merges_text),
        (CONFIG_NAME, config_to_json_string(config)),
        (SPECIAL_TOKENS_MAP_NAME, config_to_json_string(special_map)),
    ):
        write_json_atomic(folder / name, text)
        written.append(folder / name)
    return written
