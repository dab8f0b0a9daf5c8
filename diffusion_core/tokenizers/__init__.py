"""Tokenizers written here (no transformers at run time): CLIP's byte-level BPE."""

from diffusion_core.tokenizers.clip import BatchEncoding, CLIPTokenizer

__all__ = ["BatchEncoding", "CLIPTokenizer"]
