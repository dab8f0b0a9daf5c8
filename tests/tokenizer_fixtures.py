"""Test helpers for the CLIP tokenizer: the real CLIP vocabulary files and seeded, varied prompts."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

from diffusion_core.tokenizers.bpe import bytes_to_unicode

# CLIP's merges: 49152 vocabulary entries - 256 bytes - 2 specials, read after the header line.
NUM_MERGES = 49152 - 256 - 2


def open_clip_bpe_path() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz`` shipped in open_clip_torch (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_merges() -> tuple[str, ...]:
    """CLIP's merge lines (``"i n"``, ...), in rank order."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    return tuple(lines[1 : NUM_MERGES + 1])


@functools.lru_cache(maxsize=1)
def clip_words() -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary (merged tokens ending in ``</w>``), as text, sorted."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    words = set()
    for merge in clip_merges():
        token = merge.replace(" ", "")
        if token.endswith("</w>"):
            words.add(bytes(to_byte[c] for c in token[:-4]).decode("utf-8", errors="replace"))
    return tuple(sorted(words))


def write_clip_vocab(folder: Path) -> Path:
    """Write CLIP's vocab.json + merges.txt built the way CLIP builds its vocabulary; returns ``folder``."""
    merges = list(clip_merges())
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


WORDS = (
    "a photo of an astronaut riding horse on mars highly detailed digital painting trending artstation "
    "portrait woman man cat dog landscape sunset mountains river oil canvas 4k 8k unreal engine octane render "
    "cyberpunk city night neon lights concept art by greg rutkowski alphonse mucha studio ghibli anime style "
    "don't it's we're they've i'm we'll he'd o'neil rock'n'roll y'all ain't can't shouldn't "
    "DON'T IT'S WE'RE THEY'VE I'M WE'LL HE'D 'S 'T 'RE 'VE 'M 'LL 'D ''s ''' "
    "café naïve résumé über straße Ærøskøbing façade jalapeño crème brûlée São Paulo Kraków İstanbul ǅemal "
    "Σίσυφος ΟΔΥΣΣΕΥΣ москва Киев Ελλάδα עברית العربية हिन्दी ไทย 東京 北京 서울 한국어 にほんご カタカナ "
    "1234 3.14159 1,000,000 42nd 2nd 1e-5 0x1F ٣٤٥ ۱۲۳ १२३ ๓๔ ①② ½ ² Ⅻ ⅷ ３ｄ Ａｒｔ 𝐀𝐁𝐂 𝟘𝟙 "
    "<|startoftext|> <|endoftext|> <|ENDOFTEXT|> <|endoftext <|> <> |> "
    "😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ☕ 🐱‍👤 ✨🔥💯 © ® ™ … — – « » “quoted” ‘single’ ¿qué? ¡hola!"
).split()

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ '''''"
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿÀÉÎÕÜßẞİıǅǈǋ\u0301\u0300\u0308\u0327\u0303\u20dd\u0345"
    "ΣσςΑαΩωΐЁёЖжЩщ\u0483אבגשׁ\u05b7ابتث\u064b٠١٢३४५\u093f\u0947कखग\u0e31กขค"
    "中文字龍漢あいうアイウ한글\u1100\u1161\u11a8ㄱㅏ"
    "①⑳½¾²³⁴ⅠⅫⅰ〇𝐀𝐚𝟎𝟗𝔸ﬁﬀＡａ０９"
    "😀😃👍🏻🏽\u200d\ufe0f\u20e3❤☕🇫🇷🇯🇵🐱✨"
    "\t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2003\u200a\u2028\u2029\u202f\u205f\u3000\x1c\x1d\x1e\x1f\u200b\u180e\ufeff"
    "\x00\x01\x7f\u00ad\u2060\ue000\U000f0000\U0001d173"
)
CASINGS = (str.lower, str.lower, str.title, str.upper)
SEPARATORS = (" ", " ", " ", "  ", "\t", "\n", ", ", ". ", "!", "-", "_", "/", "\u3000", "\xa0", "", "\r\n", " ... ")


def _words_prompt(rng: np.random.Generator, n: int) -> str:
    """Hand-picked hard words mixed with real CLIP vocabulary words in random casing."""
    vocab_words = clip_words()
    picks = rng.integers(0, len(vocab_words), size=n)
    hard = rng.integers(0, len(WORDS), size=n)
    casing = rng.integers(0, len(CASINGS), size=n)
    use_hard = rng.random(n) < 0.4
    seps = rng.integers(0, len(SEPARATORS), size=n)
    words = [
        WORDS[h] if u else CASINGS[c](vocab_words[p]) for h, u, c, p in zip(hard, use_hard, casing, picks, strict=True)
    ]
    return "".join(w + SEPARATORS[s] for w, s in zip(words, seps, strict=True))


def _chars_prompt(rng: np.random.Generator, n: int) -> str:
    return "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=n))


def random_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` deterministic prompts: word soups, character soups, mixtures, and long prompts."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        kind = rng.integers(0, 10)
        if kind < 4:
            prompts.append(_words_prompt(rng, int(rng.integers(1, 25))))
        elif kind < 7:
            prompts.append(_chars_prompt(rng, int(rng.integers(0, 40))))
        elif kind < 9:
            parts = [_words_prompt(rng, 3), _chars_prompt(rng, 8), _words_prompt(rng, 3), _chars_prompt(rng, 4)]
            prompts.append("".join(parts[i] for i in rng.permutation(4)))
        else:
            prompts.append(_words_prompt(rng, int(rng.integers(60, 250))))
    return prompts
