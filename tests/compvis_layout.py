"""Test helper: write diffusers / transformers state dicts as one CompVis-layout single-file checkpoint.

``Pipe`` builds random-weight reference components (tiny SD 1.x / SD 2.x configs), saves their
diffusers folder and writes them as a CompVis single file with the functions below.

Written independently of ``diffusion_core.weights.single_file`` (whose inverse it is): a rule per
diffusers key pattern, from the published CompVis / LDM / OpenCLIP names, so a shared mistake
cannot hide. Checked against diffusers' own single-file loader in ``tests/test_single_file.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_tail(tail: str) -> str:
    layer, leaf = tail.rsplit(".", 1)
    return f"{_UNET_RESNET[layer]}.{leaf}"


def unet_to_compvis(state: Mapping[str, np.ndarray], layers_per_block: int) -> dict[str, np.ndarray]:
    """``{model.diffusion_model.<openaimodel name>: array}`` for a diffusers UNet2DConditionModel state dict."""
    per = layers_per_block + 1  # CompVis input/output blocks per level
    with_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"conv_in\.(.*)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"time_embedding\.linear_1\.(.*)", lambda m: f"time_embed.0.{m[1]}"),
        (r"time_embedding\.linear_2\.(.*)", lambda m: f"time_embed.2.{m[1]}"),
        (r"class_embedding\.linear_(\d)\.(.*)", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"class_embedding\.weight", lambda m: "label_emb.weight"),
        (r"add_embedding\.linear_(\d)\.(.*)", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"),  # SGM SDXL
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet_tail(m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet_tail(m[3])}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per + per - 1}.{2 if int(m[1]) in with_attention else 1}.conv.{m[2]}"),
        (r"conv_norm_out\.(.*)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(.*)", lambda m: f"out.2.{m[1]}"),
    ]  # fmt: skip
    return {f"model.diffusion_model.{_rename(key, rules)}": value for key, value in state.items()}


def _rename(key: str, rules: list[tuple[str, Callable[[re.Match], str]]]) -> str:
    for pattern, replace in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return replace(match)
    raise KeyError(f"no CompVis name for {key!r}")


def _vae_tail(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def vae_to_compvis(state: Mapping[str, np.ndarray], num_blocks: int) -> dict[str, np.ndarray]:
    """``{first_stage_model.<ldm autoencoder name>: array}``; attention q/k/v/proj_out become 1x1 convs."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_tail(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_vae_tail(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_tail(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (r"(quant_conv|post_quant_conv)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
    ]  # fmt: skip
    out = {}
    for key, value in state.items():
        name = _rename(key, rules)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[f"first_stage_model.{name}"] = value
    return out


def clip_to_compvis(
    state: Mapping[str, np.ndarray], max_positions: int, prefix: str = "cond_stage_model.transformer.text_model."
) -> dict[str, np.ndarray]:
    """SD 1.x: ``cond_stage_model.transformer.text_model.*`` (Hugging Face names) plus the position_ids buffer
    (SDXL's CLIP-L: ``prefix="conditioner.embedders.0.transformer.text_model."``)."""
    out = {f"{prefix}{k.removeprefix('text_model.')}": v for k, v in state.items()}
    out[f"{prefix}embeddings.position_ids"] = np.arange(max_positions)[None]
    return out


def clip_to_open_clip(
    state: Mapping[str, np.ndarray],
    projection_dim: int,
    extra_layer: Mapping[str, np.ndarray] | None = None,
    prefix: str = "cond_stage_model.model.",
) -> dict[str, np.ndarray]:
    """SD 2.x: the OpenCLIP text tower ``cond_stage_model.model.*`` (fused ``in_proj``, resblocks, ln_final).

    ``extra_layer`` (a transformers encoder layer's tensors, names relative to the layer) is appended
    as one more resblock, like the last layer SD 2.x checkpoints carry but do not use. A
    ``CLIPTextModelWithProjection`` state (SDXL's bigG, ``prefix="conditioner.embedders.1.model."``) gives
    its ``text_projection.weight`` transposed as OpenCLIP's ``text_projection`` (x @ P), else an identity is made up.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    projection = state.pop("text_projection.weight", None)
    out = {
        f"{prefix}token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": state.pop("embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": state.pop("final_layer_norm.weight"),
        f"{prefix}ln_final.bias": state.pop("final_layer_norm.bias"),
        f"{prefix}text_projection": (  # (width, embed_dim)
            np.eye(width, projection_dim, dtype=np.float32) if projection is None else projection.T.copy()
        ),
        f"{prefix}logit_scale": np.array(4.6052, dtype=np.float32),
    }
    layers = {int(k.split(".")[2]) for k in state}
    if extra_layer is not None:
        state.update({f"encoder.layers.{len(layers)}.{k}": v for k, v in extra_layer.items()})
        layers.add(len(layers))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}", f"{prefix}transformer.resblocks.{i}"
        for leaf in ("weight", "bias"):
            fused = [state.pop(f"{src}.self_attn.{p}.{leaf}") for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{dst}.attn.in_proj_{leaf}"] = np.concatenate(fused, axis=0)  # (3 * width, ...)
            for ours, theirs in names.items():
                out[f"{dst}.{theirs}.{leaf}"] = state.pop(f"{src}.{ours}.{leaf}")
    if state:
        raise KeyError(f"unconverted text encoder keys: {sorted(state)}")
    return out


def ema_copy(compvis_unet: Mapping[str, np.ndarray], offset: float) -> dict[str, np.ndarray]:
    """LDM's EMA copy of the UNet (``model_ema.diffusion_modelinput_blocks00weight``), values shifted by ``offset``."""
    out = {"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(10, np.int32)}
    for key, value in compvis_unet.items():
        flat = "".join(key.split(".")[1:])
        out[f"model_ema.{flat}"] = value + np.asarray(offset, value.dtype)
    return out


def write_checkpoint(path: str | Path, *parts: Mapping[str, np.ndarray], schedule: bool = True) -> dict[str, Any]:
    """Save the union of CompVis-named parts (plus the LDM schedule buffers) as one ``.safetensors``."""
    tensors: dict[str, np.ndarray] = {}
    for part in parts:
        tensors.update({k: np.ascontiguousarray(v) for k, v in part.items()})
    if schedule:
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        tensors.update({"betas": betas.astype(np.float32), "alphas_cumprod": np.cumprod(1 - betas).astype(np.float32)})
    save_file(tensors, str(path))
    return tensors


# ----------------------------------------------------------------------------- reference pipelines

UNET_CASES: dict[str, dict[str, Any]] = {
    # SD 1.x: conv proj_in/proj_out, one head width everywhere.
    "sd1": {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": 12,
        "attention_head_dim": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "sample_size": 8,
    },
    # SD 2.x: linear proj_in/proj_out, per-block head counts, three levels, two resnets per level.
    "sd2": {
        "block_out_channels": (8, 8, 16),
        "layers_per_block": 2,
        "norm_num_groups": 4,
        "cross_attention_dim": 16,
        "attention_head_dim": (2, 2, 4),
        "use_linear_projection": True,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "sample_size": 8,
    },
    # Inpainting-style input (9 channels), class labels, two transformer layers per block.
    "inpaint_classes": {
        "in_channels": 9,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": 12,
        "attention_head_dim": 4,
        "transformer_layers_per_block": 2,
        "num_class_embeds": 5,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "sample_size": 8,
    },
}
VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (4, 8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "norm_num_groups": 2,
    "layers_per_block": 1,
    "sample_size": 16,
}
CLIP_CONFIG: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "vocab_size": 1000,
    "max_position_embeddings": 77,
    "projection_dim": 16,
}
OPEN_CLIP_CONFIG: dict[str, Any] = {**CLIP_CONFIG, "hidden_act": "gelu", "num_hidden_layers": 2}


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


class Pipe:
    """Random-weight reference components, their diffusers folder and a CompVis single file."""

    def __init__(self, root: Path, unet_case: str, text: str, proj_as_conv: bool = False) -> None:
        torch.manual_seed(0)
        self.unet = diffusers.UNet2DConditionModel(**UNET_CASES[unet_case]).eval()
        self.vae = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
        clip_cfg = OPEN_CLIP_CONFIG if text == "open_clip" else CLIP_CONFIG
        self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg)).eval()
        self.folder = root / f"pipe_{unet_case}_{text}{'_conv_proj' if proj_as_conv else ''}"
        self.unet.save_pretrained(self.folder / "unet")
        self.vae.save_pretrained(self.folder / "vae")
        self.text_config = self.text_encoder.config.to_dict()
        self.states = {
            "unet": numpy_state(self.unet),
            "vae": numpy_state(self.vae),
            "text_encoder": numpy_state(self.text_encoder),
        }
        self.configs = {"unet": dict(self.unet.config), "vae": dict(self.vae.config), "text_encoder": self.text_config}
        unet = unet_to_compvis(self.states["unet"], UNET_CASES[unet_case]["layers_per_block"])
        if proj_as_conv:  # a checkpoint storing linear projections as 1x1 convs
            unet = {
                k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v
                for k, v in unet.items()
            }
        if text == "open_clip":
            extra = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**clip_cfg, "num_hidden_layers": 1}))
            extra_layer = {
                k.removeprefix("encoder.layers.0."): v for k, v in numpy_state(extra).items() if ".layers.0." in k
            }
            text_part = clip_to_open_clip(self.states["text_encoder"], clip_cfg["projection_dim"], extra_layer)
        else:
            text_part = clip_to_compvis(self.states["text_encoder"], clip_cfg["max_position_embeddings"])
        self.compvis = {"unet": unet, "vae": vae_to_compvis(self.states["vae"], 3), "text_encoder": text_part}
        self.path = root / f"{self.folder.name}.safetensors"
        self.tensors = write_checkpoint(self.path, *self.compvis.values(), ema_copy(unet, 0.5))
