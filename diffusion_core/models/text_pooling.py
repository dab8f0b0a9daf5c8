"""Which token a CLIP text encoder pools: the end-of-text position, written once for every backend.

CLIP's ``pooler_output`` is the final hidden state at the end-of-text token. Configs written
before the ``eos_token_id`` fix (transformers PR #24773) carry ``eos_token_id == 2``; for those
the end-of-text token is taken to be the largest id in each row (OpenAI's rule, which breaks
if tokens are added past it). Every other config pools the first occurrence of
``eos_token_id`` (padding may reuse that id, so the first one is the real end of text).
"""

from __future__ import annotations

from typing import Any

from diffusion_core.arrays import namespace

LEGACY_EOS_TOKEN_ID = 2


def eos_token_positions(input_ids: Any, eos_token_id: int) -> Any:
    """(B,) index of the pooled token in each row of (B, T) ``input_ids`` (numpy, torch or jax).

    A row without ``eos_token_id`` pools position 0, as the reference does.
    """
    if getattr(input_ids, "ndim", None) != 2:
        raise ValueError(
            f"input_ids: expected a (batch, sequence) array, got shape {getattr(input_ids, 'shape', None)}"
        )
    xp = namespace(input_ids)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return xp.argmax(input_ids, axis=-1)  # (B,) first largest id
    is_eos = xp.astype(input_ids == eos_token_id, xp.int32)  # (B, T) 0/1
    return xp.argmax(is_eos, axis=-1)  # (B,) first eos
