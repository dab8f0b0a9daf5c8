"""What every tokenizer's ``__call__`` shares: added-token splitting, argument checks, truncation, padding, the batch.

A tokenizer turns each text into ids (its own business), then hands the rows here: they are
checked, truncated to leave room for the special tokens it adds, wrapped in those tokens, padded
(right side, as transformers by default) and returned as lists or ``(batch, length)`` int64 arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

NO_LIMIT = 10**9  # transformers writes ~1e30 for "no model_max_length"
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: None, "do_not_pad": None}
_RETURN_TENSORS = (None, "np")


def token_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """Leftmost-longest matcher for whole added tokens."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


def split_added(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """``text`` cut into (piece, is_added_token) around the matches of ``pattern``."""
    if pattern is None:
        return [(text, False)] if text else []
    pieces: list[tuple[str, bool]] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append((text[start : match.start()], False))
        pieces.append((match.group(), True))
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


class BatchEncoding(dict):
    """``{"input_ids": ..., "attention_mask": ...}`` that also reads as attributes (``enc.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def padding_mode(
    padding: Any, max_length: Any, truncation: Any, return_tensors: Any, pad_token_id: int | None
) -> str | None:
    """Check the call's options; the padding mode ("longest", "max_length" or None)."""
    if not isinstance(padding, (bool, str)) or padding not in _PADDING:
        raise ValueError(f"padding must be one of 'max_length', 'longest', True, False, got {padding!r}")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if not isinstance(truncation, bool):
        raise ValueError(f"truncation must be True or False, got {truncation!r}")
    if return_tensors not in _RETURN_TENSORS:
        raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
    mode = _PADDING[padding]
    if mode is not None and pad_token_id is None:
        raise ValueError(f"padding={padding!r} needs a pad_token; this tokenizer has none")
    return mode


def text_list(text: Any) -> tuple[list[str], bool]:
    """``(texts, single)`` for a str or a non-empty sequence of str."""
    single = isinstance(text, str)
    texts = [text] if single else text
    if isinstance(texts, (bytes, Mapping)) or not isinstance(texts, Sequence) or not texts:
        raise ValueError(f"text must be a str or a non-empty list of str, got {text!r}")
    return list(texts), single


def encode_batch(
    texts: Sequence[str],
    single: bool,
    *,
    text_ids: Callable[[str], list[int]],
    wrap: Callable[[list[int]], list[int]],
    num_special: int,
    truncate: Callable[[list[int], int, int], list[int]] | None,
    limit: int,
    mode: str | None,
    pad_token_id: int | None,
    return_tensors: str | None,
) -> BatchEncoding:
    """Rows ``wrap(truncate(text_ids(t), room))`` padded per ``mode``, with their attention masks.

    ``num_special``: how many ids ``wrap`` adds (the truncation room is ``limit - num_special``);
    ``truncate(ids, room, limit)`` keeps ``room`` of a row's ids (None: no truncation).
    """
    if num_special and limit < num_special:
        raise ValueError(f"max_length must be >= {num_special} to hold the special tokens, got {limit}")
    rows = []
    for t in texts:
        ids = text_ids(t)
        if truncate is not None and limit < NO_LIMIT and len(ids) > limit - num_special:
            ids = truncate(ids, limit - num_special, limit)
        rows.append(wrap(ids))
    if mode == "max_length" and limit >= NO_LIMIT:
        raise ValueError("padding='max_length' needs max_length: model_max_length is unset")
    width = limit if mode == "max_length" else max(map(len, rows))
    masks = [[1] * len(r) + [0] * max(0, width - len(r)) for r in rows] if mode else [[1] * len(r) for r in rows]
    if mode:
        rows = [r + [pad_token_id] * max(0, width - len(r)) for r in rows]
    if return_tensors == "np":
        if len({len(r) for r in rows}) > 1:
            raise ValueError("return_tensors='np' needs rows of equal length: use padding or truncation=True")
        return BatchEncoding(
            input_ids=np.asarray(rows, dtype=np.int64).reshape(len(rows), -1),  # (batch, length)
            attention_mask=np.asarray(masks, dtype=np.int64).reshape(len(rows), -1),
        )
    return BatchEncoding(input_ids=rows[0] if single else rows, attention_mask=masks[0] if single else masks)
