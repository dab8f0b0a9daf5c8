"""The ``diffusion-core`` command line: ``generate``, ``train``, ``convert`` and ``info``.

Examples::

    diffusion-core generate --class 7 --num-images 16 --grid sevens.png     # the shipped digits model
    diffusion-core train --data digits --output-dir runs/digits --steps 2000
    diffusion-core train --data my_images/ --output-dir runs/mine --resume
    diffusion-core convert sd15.safetensors sd15/ --config stable-diffusion-v1-5/stable-diffusion-v1-5 --verify
    diffusion-core info runs/digits
    torchrun --nproc_per_node 2 -m diffusion_core generate --num-images 64 --output-dir digits/   # split over 2

Under ``torchrun`` (torch backend) ``generate`` splits the images and ``train`` the batches over the processes;
rank 0 writes every file. A bad argument prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from diffusion_core.cli_generate import UsageError, check_flags, join_processes, parse_size, pipeline_class

BACKENDS = ("torch", "flax")
EXIT_USAGE = 2


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
        "  diffusion-core generate --model runs/digits --backend flax --output-dir out/\n"
        '  diffusion-core generate --model sd15/ --prompt "a red fox" --guidance 7.5 --size 512x512 --grid fox.png',
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
    p.add_argument("--prompt", help="what to draw (text-to-image models, e.g. Stable Diffusion folders)")
    p.add_argument("--negative-prompt", help="what to steer away from (text-to-image models)")
    p.add_argument(
        "--guidance", type=float,
        help="classifier-free guidance scale (text-to-image: 7.5; class models trained with --class-dropout: 1.25)",
    )  # fmt: skip
    p.add_argument("--size", type=parse_size, help="HxW in pixels, e.g. 512x768 (text-to-image; default: the model's)")
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
    p.add_argument(
        "--class-dropout", type=float, default=0.0,
        help="class-labelled data: train this share of labels as 'no class' (e.g. 0.1) for guidance at generation",
    )  # fmt: skip
    p.add_argument("--size", type=_positive, default=None, help="image side in pixels (16; --model: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=_positive, default=500)
    p.add_argument(
        "--sample-every", type=_positive, default=None, help="write samples/step-<N>.png (a sample grid) every N steps"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--config", help="UNet config JSON (default: a small class-conditional UNet)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model", help="Stable Diffusion pipeline folder or Hub id to fine-tune on captioned --data")
    p.add_argument("--lora-rank", type=_positive, default=None, help="with --model: train LoRA adapters of this rank")
    p.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")


def _add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="a single-file SD 1.x/2.x checkpoint -> a diffusers pipeline folder",
        description="Examples:\n  diffusion-core convert v1-5.safetensors sd15/ "
        "--config stable-diffusion-v1-5/stable-diffusion-v1-5 --verify\n"
        "  diffusion-core convert model.ckpt out/ --config ref_pipeline/ --allow-pickle --extract-ema",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="the single-file checkpoint (.safetensors; .ckpt with --allow-pickle)")
    p.add_argument("output_dir", help="the new pipeline folder (must not exist yet)")
    p.add_argument(
        "--config",
        required=True,
        help="a diffusers pipeline folder or Hub id of the same architecture: its configs, tokenizer and scheduler",
    )
    p.add_argument("--extract-ema", action="store_true", help="take the UNet from the checkpoint's EMA copy")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickle .ckpt (torch.load weights_only)")
    p.add_argument("--verify", action="store_true", help="reload the folder in torch and flax; compare every tensor")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_train(sub)
    _add_convert(sub)
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
    """(B, H, W, C) uint8 -> one grid PNG, or one PNG per image (each written beside, then renamed)."""
    from diffusion_core.pipelines.image import image_grid, save_png

    if grid is not None:
        return [save_png(image_grid(images), grid)]
    return [save_png(im, Path(output_dir) / f"{i:04d}.png") for i, im in enumerate(images)]


def _generate(args: argparse.Namespace) -> int:
    from diffusion_core.cli_generate import generate_images, generate_text_images

    model = _model_path(args.model)
    kind = check_flags(model, pipeline_class(model), args)
    main_process = join_processes(args.backend)
    if kind == "text":
        images = generate_text_images(model, args)
    else:
        images = generate_images(
            model, args.backend, args.scheduler, args.steps, args.seed, args.num_images, args.class_label, args.guidance
        )
    if main_process:  # every process holds every image; rank 0 writes them
        for path in _save_images(images, args.grid, args.output_dir):
            print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from diffusion_core.cli_train import run_train

    join_processes(args.backend)
    return run_train(args)


def _convert(args: argparse.Namespace) -> int:
    from diffusion_core.cli_convert import convert, verify

    folder = convert(args.checkpoint, args.output_dir, args.config, args.extract_ema, args.allow_pickle)
    if args.verify:
        checked = verify(args.checkpoint, args.output_dir, args.extract_ema, args.allow_pickle)
        print("verified in torch and flax: " + ", ".join(f"{n} ({c} tensors)" for n, c in checked.items()))
    print(f"pipeline folder: {folder}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from diffusion_core.cli_train import describe

    print(json.dumps(describe(_model_path(args.model)), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad argument, one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        commands = {"generate": _generate, "train": _train, "convert": _convert, "info": _info}
        return commands[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"diffusion-core: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
