"""``diffusion-core train --model SD --data CAPTIONED [--lora-rank R]``: text-to-image fine-tuning or LoRA training.

The pipeline's UNet (or LoRA adapters on its attention projections) trains on a captioned folder (images and
``metadata.jsonl``); the VAE and text encoder stay frozen. The output folder is the fine-tuned pipeline, or
``pytorch_lora_weights.safetensors`` (diffusers' PEFT format) for a LoRA run.
"""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_core import training
from diffusion_core.cli_train import fit_and_report, train_config
from diffusion_core.training.captions import METADATA_FILE, check_sd_pipeline, is_captioned_folder


def _check_args(args: argparse.Namespace) -> None:
    if args.config is not None:
        raise ValueError("--config: not used with --model (the UNet is the pipeline's)")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise ValueError("--lora-alpha: needs --lora-rank")
    if args.data == "digits" or not is_captioned_folder(args.data):
        raise ValueError(f"--data: with --model, a folder of images with {METADATA_FILE} is needed, got {args.data!r}")


def _load_pipeline(backend: str, model: str) -> Any:
    if backend == "torch":
        from diffusion_core.torch import DiffusionPipeline
    else:
        from diffusion_core.flax import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(model)
    check_sd_pipeline(pipe, f"--model {model!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trainer_module(backend: str) -> Any:
    if backend == "torch":
        from diffusion_core.torch import training_text
    else:
        from diffusion_core.flax import training_text
    return training_text


def run_text_train(args: argparse.Namespace) -> int:
    _check_args(args)
    config = train_config(args)
    lora = None if args.lora_rank is None else training.LoraTrainConfig(rank=args.lora_rank, alpha=args.lora_alpha)
    pipe = _load_pipeline(args.backend, args.model)
    size = args.size if args.size is not None else int(pipe.unet.config["sample_size"]) * pipe.vae_scale_factor
    module = _trainer_module(args.backend)
    dataset = module.encode_dataset(pipe, training.load_captioned_folder(args.data, size))
    return fit_and_report(module.TextToImageTrainer(pipe, config, lora), dataset, args)
