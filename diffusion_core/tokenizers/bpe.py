"""Byte-level BPE (GPT-2 / CLIP flavour): UTF-8 bytes as printable characters, ranked merges, ``</w>`` ends.

A word is UTF-8 encoded, each byte mapped to its printable stand-in character, the last symbol gets the
end-of-word suffix, then the lowest-ranked adjacent pair is merged until no ranked pair remains.
Results are cached per word, so repeated words cost one dictionary lookup.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from itertools import repeat

_UNRANKED = 1 << 62  # rank of a pair that has no merge


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to U+0100 upwards.

    Ordered as CLIP's vocabulary lists them: the printable bytes first, then the remapped ones.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remapped)})
    return table


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def parse_merges(lines: Sequence[str]) -> list[tuple[str, str]]:
    """``merges.txt`` lines (``"#version"`` header and blank lines skipped) -> ordered pairs."""
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merges: line {number} must hold two space-separated symbols, got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


class ByteLevelBPE:
    """Word -> token ids with ranked merges; ``vocab`` maps token strings to ids."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        unk_id: int | None,
        end_of_word_suffix: str = "</w>",
        cache_size: int = 100_000,
    ) -> None:
        self.vocab = dict(vocab)
        self.ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}
        for a, b in self.ranks:
            if a + b not in self.vocab:
                raise ValueError(f"merges: merge {a!r} + {b!r} gives {a + b!r}, which is not in the vocabulary")
        self.unk_id = unk_id
        self.suffix = end_of_word_suffix
        self.cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}
        self._byte_chars = bytes_to_unicode()

    def _merge(self, symbols: list[str]) -> list[str]:
        """Repeatedly merge every occurrence of the lowest-ranked adjacent pair (left to right)."""
        rank_of = self.ranks.get
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:], strict=False))
            pair_ranks = list(map(rank_of, pairs, repeat(_UNRANKED)))
            best_rank = min(pair_ranks)
            if best_rank == _UNRANKED:
                break
            first, second = pairs[pair_ranks.index(best_rank)]
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                try:
                    j = symbols.index(first, i)
                except ValueError:
                    merged += symbols[i:]
                    break
                merged += symbols[i:j]
                if j + 1 < len(symbols) and symbols[j + 1] == second:
                    merged.append(first + second)
                    i = j + 2
                else:
                    merged.append(first)
                    i = j + 1
            symbols = merged
        return symbols

    def _ids(self, symbols: list[str]) -> tuple[int, ...]:
        ids: list[int] = []
        for symbol in symbols:
            token_id = self.vocab.get(symbol, self.unk_id)
            if token_id is None:
                raise ValueError(f"text: symbol {symbol!r} is not in the vocabulary and there is no unk_token")
            ids.append(token_id)
        return tuple(ids)

    def word_to_ids(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenized word (cached)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = [self._byte_chars[b] for b in word.encode("utf-8")]
        if not chars:
            return ()
        chars[-1] += self.suffix
        # A symbol missing from the vocabulary can never take part in a merge: keep it apart.
        ids = self._ids(self._merge(chars)) if all(c in self.vocab for c in chars) else self._ids_with_unknowns(chars)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _ids_with_unknowns(self, chars: list[str]) -> tuple[int, ...]:
        """Merge the known runs between unknown symbols separately; each unknown symbol becomes ``unk``."""
        out: list[str] = []
        run: list[str] = []
        for c in chars:
            if c in self.vocab:
                run.append(c)
                continue
            out += self._merge(run) if run else []
            out.append(c)
            run = []
        out += self._merge(run) if run else []
        return self._ids(out)

    def decode_bytes(self, tokens: Sequence[str]) -> bytes:
        """Tokens -> raw bytes; a token with a character outside the byte alphabet contributes its UTF-8."""
        table = unicode_to_bytes()
        out = bytearray()
        for token in tokens:
            try:
                out += bytes([table[c] for c in token])
            except KeyError:
                out += token.encode("utf-8")
        return bytes(out)
