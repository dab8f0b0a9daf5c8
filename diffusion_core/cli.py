"""The ``diffusion-core`` command line: ``generate``, ``train`` and ``info``.

Examples::

    diffusion-core generate --class 7 --num-images 16 --grid sevens.png     # the shipped digits model
    diffusion-core train --data digits --output-dir runs/digits --steps 2000
    diffusion-core train --data my_images/ --output-dir runs/mine --resume
    diffusion-core info runs/digits

A bad argument prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

BACKENDS = ("torch", "flax")
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command-line argument (one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="make images with a pipeline (default: the shipped digits model)",
        description="Examples:\n  diffusion-core generate --class 3 --grid threes.png\n"
        "  diffusion-core generate --model runs/digits --backend flax --output-dir out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="pipeline folder or Hub id (default: the shipped digits model)")
    p.add_argument(
        "--class",
        dest="class_label",
        type=int,
        action="append",
        help="class id for a class-conditional model (repeat to cycle through several; default: every class in turn)",
    )
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--scheduler", default=None, help="scheduler class name, e.g. DDIMScheduler (default: DDIM)")
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=_positive, default=16)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--grid", help="write all images as one grid PNG here")
    out.add_argument("--output-dir", help="write one PNG per image into this folder")


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a UNet2DModel; the output folder is a diffusers pipeline folder",
        description="Examples:\n  diffusion-core train --data digits --output-dir runs/digits\n"
        "  diffusion-core train --data images/ --output-dir runs/mine --resume\n"
        "  diffusion-core train --model sd-folder --data captioned/ --lora-rank 4 --output-dir runs/lora\n"
        '    (captioned/: images + metadata.jsonl lines {"file_name": ..., "text": ...})',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="'digits' (scikit-learn) or a folder of images (sub-folders: classes)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--steps", type=_positive, default=2000)
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting (e.g. 5)")
    p.add_argument("--size", type=_positive, default=None, help="image side in pixels (16; --model: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=_positive, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--config", help="UNet config JSON (default: a small class-conditional UNet)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model", help="Stable Diffusion pipeline folder or Hub id to fine-tune on captioned --data")
    p.add_argument("--lora-rank", type=_positive, default=None, help="with --model: train LoRA adapters of this rank")
    p.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_train(sub)
    info = sub.add_parser("info", help="what a pipeline folder or Hub id holds")
    info.add_argument("model", nargs="?", help="folder or Hub id (default: the shipped digits model)")
    return parser


def _model_path(model: str | None) -> str:
    from diffusion_core.training.presets import default_model_path

    if model is not None:
        return model
    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise UsageError(f"--model: the shipped default model is missing from {path}")
    return str(path)


def _save_images(images: np.ndarray, grid: str | None, output_dir: str | None) -> list[Path]:
    """(B, H, W, C) uint8 -> one grid PNG, or one PNG per image."""
    from PIL import Image

    if grid is not None:
        n = images.shape[0]
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        h, w, c = images.shape[1:]
        canvas = np.zeros((rows * h, cols * w, c), np.uint8)
        for i, im in enumerate(images):
            canvas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
        path = Path(grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas).save(path)
        return [path]
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(paths[-1])
    return paths


def generate_images(
    model: str,
    backend: str,
    scheduler: str | None,
    steps: int,
    seed: int,
    num_images: int,
    class_labels: Sequence[int] | None,
) -> np.ndarray:
    """(B, H, W, C) uint8 images from a pixel-space DDPM/DDIM pipeline on ``backend``."""
    from diffusion_core import schedulers

    labels = None
    if class_labels:
        labels = np.resize(np.asarray(class_labels, np.int64), num_images)
    if backend == "torch":
        import torch

        from diffusion_core.torch import DDPMPipeline
    else:
        from diffusion_core.flax import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(model)
    classes = pipe.unet.config.get("num_class_embeds")
    if labels is not None and not classes:
        raise UsageError(f"--class: the model {model!r} is not class-conditional; leave --class out")
    if labels is not None and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"--class: this model has classes 0 to {classes - 1}, got {sorted(set(class_labels))}")
    if labels is None and classes:  # no --class: cycle through every class (one per grid column for 10)
        labels = np.resize(np.arange(classes, dtype=np.int64), num_images)
    name = scheduler or "DDIMScheduler"
    try:
        pipe.scheduler = schedulers.from_config({**pipe.scheduler.config, "_class_name": name})
    except (KeyError, ValueError) as err:
        raise UsageError(f"--scheduler: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": num_images, "num_inference_steps": steps, "output_type": "np", "class_labels": labels}
    if backend == "torch":
        kwargs["generator"] = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    else:
        import jax

        kwargs["key"] = jax.random.key(seed)
    images = pipe(**kwargs).images  # (B, H, W, C) float in [0, 1]
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _generate(args: argparse.Namespace) -> int:
    model = _model_path(args.model)
    images = generate_images(
        model, args.backend, args.scheduler, args.steps, args.seed, args.num_images, args.class_label
    )
    for path in _save_images(images, args.grid, args.output_dir):
        print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from diffusion_core.cli_train import run_train

    return run_train(args)


def _info(args: argparse.Namespace) -> int:
    from diffusion_core.cli_train import describe

    print(json.dumps(describe(_model_path(args.model)), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad argument, one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {"generate": _generate, "train": _train, "info": _info}[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"diffusion-core: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
