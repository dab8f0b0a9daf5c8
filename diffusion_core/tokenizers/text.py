"""CLIP text cleaning and pre-tokenization with stdlib ``re`` + ``unicodedata`` (no ``regex`` package).

CLIP splits lower-cased, NFC-normalised text with
``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (whitespace is dropped). Python's ``re``
has no ``\\p{..}``, so the letter / number classes are built once from ``unicodedata`` general categories
(L* / N*), and ``\\s`` is the Unicode ``White_Space`` set (what Oniguruma, used by the reference
tokenizer, means by ``\\s``; Python's ``\\s`` would also match U+001C..U+001F).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

# Unicode White_Space property (Oniguruma's \s): tab..CR, space, NEL, NBSP, Ogham, en quad..hair space,
# line/paragraph separators, narrow NBSP, medium math space, ideographic space.
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"
)

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Special-token literals CLIP's pattern keeps whole; the byte-level stage then splits them like GPT-2 does.
_SPECIAL_LITERALS = {"<|startoftext|>": ("<|", "startoftext", "|>"), "<|endoftext|>": ("<|", "endoftext", "|>")}


def _ranges(codepoints: list[int]) -> str:
    """A ``re`` character-class body (``a-zà-ö...``) covering exactly ``codepoints`` (sorted)."""
    parts: list[str] = []
    start = prev = codepoints[0]
    for cp in codepoints[1:] + [-1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
        start = prev = cp
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _category_classes() -> tuple[str, str]:
    """Class bodies for ``\\p{L}`` and ``\\p{N}`` from this Python's Unicode database."""
    letters: list[int] = []
    numbers: list[int] = []
    category = unicodedata.category
    for cp in range(sys.maxunicode + 1):
        major = category(chr(cp))[0]
        if major == "L":
            letters.append(cp)
        elif major == "N":
            numbers.append(cp)
    return _ranges(letters), _ranges(numbers)


@functools.lru_cache(maxsize=1)
def clip_split_pattern() -> re.Pattern[str]:
    """The compiled CLIP pre-tokenizer pattern (built on first use: one pass over all code points)."""
    letters, numbers = _category_classes()
    space = re.escape(WHITESPACE)
    specials = "|".join(re.escape(s) for s in _SPECIAL_LITERALS)
    contractions = "|".join(_CONTRACTIONS)
    return re.compile(f"{specials}|{contractions}|[{letters}]+|[{numbers}]|[^{space}{letters}{numbers}]+")


def lowercase(text: str) -> str:
    """Per-character full lower-casing (no context rules: a word-final Σ becomes σ, not ς)."""
    if "\u03a3" not in text:  # final sigma is the only context rule of str.lower
        return text.lower()
    return "".join([c.lower() for c in text])


def normalize(text: str) -> str:
    """CLIP's text cleaning without ftfy: NFC, then lower-casing (whitespace runs only separate words)."""
    return lowercase(unicodedata.normalize("NFC", text))


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text into the words BPE sees; whitespace is dropped."""
    words: list[str] = []
    for word in clip_split_pattern().findall(text):
        words.extend(_SPECIAL_LITERALS.get(word, (word,)))
    return words
