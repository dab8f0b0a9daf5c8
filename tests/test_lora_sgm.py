"""kohya SDXL LoRA names in the original UNet layout (``lora_unet_input_blocks_*``) land on the layers diffusers
0.42.1 maps them to (its ``lora_state_dict`` conversion is the oracle), on a tiny SDXL-shaped diffusers UNet."""

import re

import diffusers
import numpy as np
import pytest
import torch

from diffusion_core.weights.lora import parse_lora
from diffusion_core.weights.lora_sgm import layers_per_block, sgm_to_diffusers

# One name per kind of layer of a 2-level SDXL-shaped UNet (2 resnets per block, attention in the second level).
SGM_NAMES = [
    "input_blocks_0_0",
    "input_blocks_1_0_in_layers_2",
    "input_blocks_2_0_emb_layers_1",
    "input_blocks_3_0_op",
    "input_blocks_4_0_skip_connection",
    "input_blocks_4_1_proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "middle_block_0_in_layers_2",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "middle_block_2_out_layers_3",
    "output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
    "output_blocks_2_2_conv",
    "output_blocks_4_0_out_layers_3",
    "output_blocks_5_0_skip_connection",
    "time_embed_0",
    "label_emb_0_2",
    "out_2",
]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )


def _diffusers_paths(unet) -> dict[str, str]:
    """kohya name -> the layer path diffusers converts it to (one name per conversion)."""
    paths = {}
    for name in SGM_NAMES:
        state = {f"lora_unet_{name}.{part}": torch.zeros(1, 1) for part in ("lora_down.weight", "lora_up.weight")}
        converted, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
        (down,) = [k[len("unet.") : -len(".down.weight")] for k in converted if k.endswith(".down.weight")]
        # attention projections come out in diffusers' older processor names: attn1.processor.to_q_lora
        down = re.sub(r"processor\.to_(q|k|v)_lora$", r"to_\1", down).replace("processor.to_out_lora", "to_out.0")
        paths[name] = down.removesuffix(".lora")
    return paths


def test_sgm_names_land_where_diffusers_puts_them(unet):
    targets = {
        n: tuple(m.weight.shape) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    assert layers_per_block(targets) == 2
    expected = _diffusers_paths(unet)
    tensors = {}
    for name, path in expected.items():
        weight = targets[path]
        tensors[f"lora_unet_{name}.lora_down.weight"] = np.ones((1, *weight[1:]), np.float32)
        tensors[f"lora_unet_{name}.lora_up.weight"] = np.ones((weight[0], 1) + (1, 1) * (len(weight) == 4), np.float32)
    layers = parse_lora(tensors, {"unet": targets})["unet"]
    assert sorted(layers) == sorted(expected.values())
    for name, path in expected.items():  # each name on diffusers' layer, not just the same set
        single = {k: v for k, v in tensors.items() if k.startswith(f"lora_unet_{name}.")}
        assert list(parse_lora(single, {"unet": targets})["unet"]) == [path], name


def test_names_that_are_not_sgm_layers():
    assert sgm_to_diffusers("down_blocks_0_resnets_0_conv1", 2) is None
    assert sgm_to_diffusers("middle_block_7_proj_in", 2) is None
    assert sgm_to_diffusers("input_blocks_3_0_conv", 2) is None  # a downsampler's layer is "op"
    assert sgm_to_diffusers("input_blocks_4_1_proj_in", None) is None  # not a diffusers UNet: no block size
