"""kohya's SDXL UNet names (the original "sgm" UNet: ``input_blocks`` / ``middle_block`` / ``output_blocks``) as
diffusers names, underscore-joined, for ``diffusion_core.weights.lora`` to resolve against the model's layers.

sd-scripts trains SD 1.x on diffusers' UNet (its names need nothing) but SDXL on the original one, so an SDXL
kohya LoRA says ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` for diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. With ``L`` resnets per block, input block ``i``
(from 1) is layer ``(i - 1) % (L + 1)`` of down block ``(i - 1) // (L + 1)`` (the last layer is the downsampler),
output block ``i`` is layer ``i % (L + 1)`` of up block ``i // (L + 1)``; the middle block is resnet, attention,
resnet. Inside a block, item 0 is the resnet, 1 the attention (2, in output blocks, the upsampler); resnet
layers are renamed (``in_layers_2`` -> ``conv1``, ``emb_layers_1`` -> ``time_emb_proj``, ``out_layers_3`` ->
``conv2``, ``skip_connection`` -> ``conv_shortcut``), as are the top-level layers (``input_blocks_0_0`` ->
``conv_in``, ``time_embed_0`` -> ``time_embedding_linear_1``, ``label_emb_0_0`` -> ``add_embedding_linear_1``,
``out_2`` -> ``conv_out``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SGM_TOP = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_2": "conv_out",
}
SGM_RESNET = {
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
SGM_MIDDLE = ("resnets_0", "attentions_0", "resnets_1")
_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)_(\d+)_(?:(\d+)_)?(.+)")


def layers_per_block(paths: Iterable[str]) -> int | None:
    """Resnets per down block of a diffusers UNet, read off its layer paths (None: not a diffusers UNet)."""
    found = [int(m.group(1)) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))]
    return max(found) + 1 if found else None


def _tail(tail: str) -> str:
    return SGM_RESNET.get(tail, tail)


def _input(i: int, j: int, tail: str, per_block: int) -> str | None:
    block, layer = divmod(i - 1, per_block + 1)
    if layer == per_block:  # the downsampler: input_blocks_<i>_0_op
        return f"down_blocks_{block}_downsamplers_0_conv" if tail == "op" else None
    kind = ("resnets", "attentions")[j] if j < 2 else None
    return f"down_blocks_{block}_{kind}_{layer}_{_tail(tail)}" if kind else None


def _output(i: int, j: int, tail: str, per_block: int) -> str:
    block, layer = divmod(i, per_block + 1)
    if j == 2:
        return f"up_blocks_{block}_upsamplers_0_{tail}"
    return f"up_blocks_{block}_{('resnets', 'attentions')[j]}_{layer}_{_tail(tail)}"


def sgm_to_diffusers(name: str, per_block: int | None) -> str | None:
    """The diffusers name (underscore-joined) of a kohya sgm UNet layer name; None if ``name`` is not one."""
    for head, renamed in SGM_TOP.items():
        if name == head or name.startswith(head + "_"):
            return renamed + name[len(head) :]
    match = _BLOCK.fullmatch(name)
    if match is None or per_block is None:
        return None
    kind, i, j, tail = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if kind == "middle_block":
        if j is not None:  # middle_block_<i>_<tail>: no item index
            tail = f"{j}_{tail}"
        return f"mid_block_{SGM_MIDDLE[i]}_{_tail(tail)}" if i < len(SGM_MIDDLE) else None
    if j is None:
        return None
    if kind == "input_blocks":
        return _input(i, int(j), tail, per_block) if i > 0 else None
    return _output(i, int(j), tail, per_block)
