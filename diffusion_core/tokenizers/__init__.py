"""Tokenizers (no transformers at run time): CLIP's BPE written here; T5's SentencePiece via the [t5] extra."""

from diffusion_core.tokenizers.clip import CLIPTokenizer
from diffusion_core.tokenizers.encoding import BatchEncoding
from diffusion_core.tokenizers.t5 import T5Tokenizer, T5TokenizerFast

__all__ = ["BatchEncoding", "CLIPTokenizer", "T5Tokenizer", "T5TokenizerFast"]
