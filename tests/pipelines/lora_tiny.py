"""Tiny LoRA files for the LoRA pipeline tests: made with diffusers + peft on the tiny SD pipeline of ``sd_tiny``.

``save_peft_lora`` injects a PEFT LoRA with random, non-zero ``lora_B`` (``init_lora_weights=False``) into the
tiny UNet (attention projections, ``proj_in`` 1x1 convs, resnet 3x3 convs) and optionally the text encoder, and
writes it with diffusers' own ``save_lora_weights`` (with its ``lora_adapter_metadata``: alpha != rank).
``write_kohya`` rewrites the same weights in kohya / sd-scripts names with ``.alpha`` keys. ``save_sdxl_peft_lora``
does the same on the tiny SDXL base of ``sdxl_tiny`` (UNet and both text encoders).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.pipelines import sd_tiny, sdxl_tiny

SIZE = 32
STEPS = 2
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in module.state_dict().items() if "lora_" in k}


def save_peft_lora(folder: Path, seed: int, rank: int = 4, alpha: int = 8, text_encoder: bool = True) -> Path:
    """A PEFT LoRA (UNet, and text encoder if asked) of the tiny SD pipeline, saved by diffusers into ``folder``."""
    pipe = sd_tiny.diffusers_sd_pipeline()
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_encoder:
        _add_text_lora(pipe, "text_encoder", layers, metadata, rank=2, alpha=3)
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, **layers, **metadata)
    return folder


def _add_text_lora(pipe, name: str, layers: dict, metadata: dict, rank: int, alpha: int) -> None:
    """Inject a PEFT LoRA into ``pipe.<name>`` (a CLIP text encoder) and record its layers and metadata."""
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS)
    inject_adapter_in_model(config, getattr(pipe, name))  # transformers' add_adapter needs peft >= 0.22
    layers[f"{name}_lora_layers"] = _lora_state(getattr(pipe, name))
    metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()


def save_sdxl_peft_lora(folder: Path, seed: int = 1) -> Path:
    """A PEFT LoRA of the tiny SDXL base (``sdxl_tiny``) on the UNet and both text encoders (each its own rank and
    alpha != rank), saved by diffusers' ``StableDiffusionXLPipeline.save_lora_weights`` into ``folder``."""
    pipe = diffusers.StableDiffusionXLPipeline(**sdxl_tiny.sdxl_components())
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    _add_text_lora(pipe, "text_encoder", layers, metadata, rank=2, alpha=3)
    _add_text_lora(pipe, "text_encoder_2", layers, metadata, rank=3, alpha=6)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(folder, **layers, **metadata)
    return folder


_KOHYA = {"unet.": "lora_unet_", "text_encoder.": "lora_te_text_model_"}  # published kohya text names keep text_model
_ROLES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def write_kohya(peft_folder: Path, path: Path) -> Path:
    """The LoRA of ``peft_folder`` in kohya names, each layer with its ``.alpha`` (from diffusers' metadata)."""
    with safe_open(peft_folder / "pytorch_lora_weights.safetensors", "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    out = {}
    for key, value in tensors.items():
        prefix = next(p for p in _KOHYA if key.startswith(p))
        role = next(r for r in _ROLES if key.endswith(r))
        name = _KOHYA[prefix] + key[len(prefix) : -len(role)].replace(".", "_")
        out[name + _ROLES[role]] = value
        out[name + ".alpha"] = np.asarray(metadata[prefix + "lora_alpha"], np.float32)
    save_file(out, path)
    return path


def run(pipe, torch_reference: bool = False, **kwargs) -> np.ndarray:
    """The tiny pipeline's image for the test prompt from fixed start latents (numpy or torch for diffusers)."""
    latents = sd_tiny.start_latents((1, 4, SIZE // 2, SIZE // 2))
    if torch_reference:
        latents = torch.from_numpy(latents)
    common = dict(prompt=sd_tiny.PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    return pipe(latents=latents, **common, **kwargs).images


def lora_folders(root: Path) -> dict[str, Path]:
    """The tiny SD pipeline ("sd"), LoRA "a" (UNet + text encoder, rank 4), LoRA "b" (UNet, rank 2) and "a" in
    kohya form ("kohya", a file)."""
    a = save_peft_lora(root / "a", seed=1)
    b = save_peft_lora(root / "b", seed=2, rank=2, alpha=2, text_encoder=False)
    return dict(sd=sd_tiny.save_sd_pipeline(root / "sd"), a=a, b=b, kohya=write_kohya(a, root / "k.safetensors"))


def reference(folders: dict[str, Path], *loads: str, weights: list[float] | None = None):
    """diffusers on the tiny pipeline with the named LoRAs loaded (and ``set_adapters(loads, weights)``)."""
    ref = sd_tiny.load_diffusers(folders["sd"])
    for name in loads:
        ref.load_lora_weights(folders[name], adapter_name=name)
    if weights is not None:
        ref.set_adapters(list(loads), weights)
    return ref
