"""Tokenizers written here (no transformers at run time): CLIP's byte-level BPE."""

from diffusion_core.tokenizers.clip import CLIPTokenizer
from diffusion_core.tokenizers.encoding import BatchEncoding

__all__ = ["BatchEncoding", "CLIPTokenizer"]
