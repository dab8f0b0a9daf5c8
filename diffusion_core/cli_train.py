"""The ``train`` and ``info`` subcommands of ``diffusion-core`` (the parser lives in ``diffusion_core.cli``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from diffusion_core import schedulers, training
from diffusion_core.pipelines.unconditional import read_class_info
from diffusion_core.training.data import num_class_embeds
from diffusion_core.training.presets import DEFAULT_SCHEDULER_CONFIG, unet_config_for


def load_data(data: str, size: int) -> training.ImageDataset:
    if data == "digits":
        return training.load_digits(size)
    if not Path(data).is_dir():
        raise ValueError(f"--data: expected 'digits' or a folder of images, got {data!r}")
    return training.load_image_folder(data, size, channels=3)


def _unet_config(args: argparse.Namespace, dataset: training.ImageDataset) -> dict[str, Any]:
    if args.config is None:
        channels = dataset.images.shape[1]
        return unet_config_for(channels, args.size, num_class_embeds(dataset, args.class_dropout) or 0)
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"--config: no such file {args.config!r}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--config: {args.config!r} is not valid JSON ({err})") from err
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_trainer(backend: str, unet_config: dict[str, Any], config: training.TrainConfig) -> Any:
    """A backend trainer around a freshly initialised UNet2DModel (weights seeded by ``config.seed``)."""
    scheduler = schedulers.from_config(dict(DEFAULT_SCHEDULER_CONFIG))
    if backend == "torch":
        import torch

        from diffusion_core.torch import UNet2DModel
        from diffusion_core.torch.training import Trainer

        torch.manual_seed(config.seed)
        return Trainer(UNet2DModel(**unet_config), scheduler, config)
    from flax import nnx

    from diffusion_core.flax import UNet2DModel
    from diffusion_core.flax.training import Trainer

    return Trainer(UNet2DModel(**unet_config, rngs=nnx.Rngs(config.seed)), scheduler, config)


def train_config(args: argparse.Namespace) -> training.TrainConfig:
    """The ``TrainConfig`` of the command's options."""
    return training.TrainConfig(
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.warmup_steps,
        snr_gamma=args.snr_gamma,
        class_dropout=args.class_dropout,
        seed=args.seed,
    )


def run_train(args: argparse.Namespace) -> int:
    if args.model is not None:
        from diffusion_core.cli_text import run_text_train

        return run_text_train(args)
    for name in ("lora_rank", "lora_alpha"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: needs --model (a Stable Diffusion pipeline to adapt)")
    args.size = 16 if args.size is None else args.size
    dataset = load_data(args.data, args.size)
    trainer = build_trainer(args.backend, _unet_config(args, dataset), train_config(args))
    return fit_and_report(trainer, dataset, args)


def fit_and_report(trainer: Any, dataset: training.ImageDataset, args: argparse.Namespace) -> int:
    """Run ``trainer.fit`` with the command's options and print a two-line summary."""
    start = time.perf_counter()
    losses = trainer.fit(
        dataset,
        args.steps,
        args.output_dir,
        args.checkpoint_every,
        args.resume,
        progress=not args.no_progress,
        sample_every=args.sample_every,
    )
    seconds = time.perf_counter() - start
    if not trainer.is_main_process:  # under torchrun rank 0 reports
        return 0
    tail = losses[-50:]
    mean = sum(tail) / len(tail) if tail else float("nan")
    print(f"trained {len(losses)} steps in {seconds:.1f} s; mean loss of the last {len(tail)}: {mean:.4f}")
    print(f"pipeline folder: {args.output_dir}")
    return 0


def _weights_summary(folder: Path) -> dict[str, Any]:
    """Parameter count, dtypes and bytes of the safetensors files in ``folder`` (headers only)."""
    from safetensors import safe_open

    count, dtypes, size = 0, set(), 0
    for path in sorted(folder.glob("*.safetensors")):
        size += path.stat().st_size
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                info = f.get_slice(key)
                shape = info.get_shape()
                n = 1
                for d in shape:
                    n *= d
                count += n
                dtypes.add(info.get_dtype())
    return {"parameters": count, "dtypes": sorted(dtypes), "bytes": size}


def describe(model: str) -> dict[str, Any]:
    """What a pipeline folder or Hub id holds: pipeline class, components, classes, parameters, dtypes, size.

    A Hub id is read from the local Hub cache (fetched first when the Hub is reachable), as ``generate`` does.
    """
    from diffusion_core.pipelines.hub import resolve_pipeline_folder

    try:
        root = resolve_pipeline_folder(model)[0]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model: {err}") from err
    index = json.loads((root / "model_index.json").read_text())
    out: dict[str, Any] = {"pipeline": index.get("_class_name"), "components": {}}
    total = 0
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        entry: dict[str, Any] = {"class": spec[1]}
        sub = root / name
        for cfg_name in ("config.json", "scheduler_config.json"):
            if (sub / cfg_name).is_file():
                cfg = json.loads((sub / cfg_name).read_text())
                if cfg.get("num_class_embeds"):
                    entry["classes"] = cfg["num_class_embeds"]
                if cfg.get("sample_size"):
                    entry["sample_size"] = cfg["sample_size"]
        if sub.is_dir():
            entry.update(_weights_summary(sub))
            total += entry["bytes"]
        out["components"][name] = entry
    out["total_bytes"] = total
    classes = read_class_info(root)
    if classes is not None:
        out["class_names"] = list(classes.names)
        out["unconditional_class_label"] = classes.unconditional_class_label
    return out
