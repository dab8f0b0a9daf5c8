"""Test helper: the tiny SDXL pipelines of ``tests/pipelines/sdxl_tiny.py`` written as SGM (Stability) single files.

Layout of the original SDXL checkpoints: ``model.diffusion_model.*`` (openaimodel UNet, ``label_emb`` the
``text_time`` addition MLP), ``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.text_model.*``
(CLIP-L, Hugging Face names) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG: fused in_proj, ``ln_final``,
``text_projection`` as a (width, projection) matrix); the refiner has only bigG, as ``conditioner.embedders.0.model``.
The second encoder is wider (48) than the first (32), as in SDXL (1280 vs 768): diffusers' loader tells the two
encoders apart by width. Built from ``tests.compvis_layout``'s converters (independent of the library); checked
against diffusers' own ``from_single_file`` in ``tests/test_sdxl_single_file.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from tests import compvis_layout as cl
from tests.pipelines import sdxl_tiny

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TEXT_2 = {**sdxl_tiny.TEXT, "hidden_size": 48, "intermediate_size": 41}


def sgm_components(refiner: bool) -> dict[str, Any]:
    """``sdxl_tiny``'s components with a 48-wide second encoder (the UNet's cross-attention width to match)."""
    components = sdxl_tiny.sdxl_components(refiner)
    config = {**sdxl_tiny.unet_config(refiner), "cross_attention_dim": 48 if refiner else 32 + 48}
    torch.manual_seed(2)
    components["unet"] = diffusers.UNet2DConditionModel(**config).eval()
    components["text_encoder_2"] = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_2))
    components["text_encoder_2"].eval()
    return components


class SgmPipe:
    """A tiny SDXL base or refiner: its reference components, diffusers folder and SGM single file."""

    def __init__(self, root: Path, refiner: bool = False) -> None:
        self.refiner = refiner
        components = sgm_components(refiner)
        self.models = {name: components[name] for name in COMPONENTS if components[name] is not None}
        self.folder = root / ("sdxl_refiner" if refiner else "sdxl_base")
        if refiner:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True)
        else:
            pipe = diffusers.StableDiffusionXLPipeline(**components)
        pipe.save_pretrained(self.folder)
        self.states = {name: cl.numpy_state(model) for name, model in self.models.items()}
        self.configs: dict[str, dict[str, Any]] = {
            name: dict(model.config) if name in ("unet", "vae") else model.config.to_dict()
            for name, model in self.models.items()
        }
        text = sdxl_tiny.TEXT
        parts = [
            cl.unet_to_compvis(self.states["unet"], self.configs["unet"]["layers_per_block"]),
            cl.vae_to_compvis(self.states["vae"], len(self.configs["vae"]["block_out_channels"])),
            cl.clip_to_open_clip(
                self.states["text_encoder_2"],
                text["projection_dim"],
                prefix=f"conditioner.embedders.{0 if refiner else 1}.model.",
            ),
        ]
        if not refiner:
            prefix = "conditioner.embedders.0.transformer.text_model."
            parts.append(cl.clip_to_compvis(self.states["text_encoder"], text["max_position_embeddings"], prefix))
        self.path = root / f"{self.folder.name}.safetensors"
        self.tensors = cl.write_checkpoint(self.path, *parts)
