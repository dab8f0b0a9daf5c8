"""Resumable checkpoint layout and atomic writes.

``output_dir/checkpoints/checkpoint-<step>/`` holds ``unet/`` (diffusers layout), ``unet_ema/`` (the EMA
weights, same layout), ``optimizer.safetensors`` (the optimiser state as flat arrays) and
``trainer_state.json`` (step, seed, config, data position). A LoRA run keeps its adapters there instead of
``unet/``: ``pytorch_lora_weights.safetensors`` (and ``pytorch_lora_weights_ema.safetensors``), PEFT format.
A checkpoint is written in a hidden folder beside its final name, fsynced, then renamed, so one that exists
is complete. The output folder itself is a diffusers pipeline folder (``model_index.json``, ``unet/``,
``scheduler/``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.atomic import atomic_folder, fsync_dir, swap_into_place
from diffusion_core.configuration import remove_stale_temporaries, write_json_atomic

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
UNET, UNET_EMA = "unet", "unet_ema"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints under ``output_dir``, ascending."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    steps = checkpoint_steps(output_dir)
    return Path(output_dir) / CHECKPOINTS / f"checkpoint-{steps[-1]}" if steps else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, deepest first, then ``folder``."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def write_checkpoint(
    output_dir: str | os.PathLike, step: int, state: Mapping[str, Any], write: Callable[[Path], None], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically: ``write(folder)`` fills it, then ``trainer_state.json``; keeps ``keep``.

    Through :func:`diffusion_core.atomic.atomic_folder`: what a killed write left is removed first.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"checkpoint-{step}"
    with atomic_folder(final) as tmp:
        write(tmp)
        write_json_atomic(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        _fsync_tree(tmp)
    for old in checkpoint_steps(output_dir)[:-keep]:
        shutil.rmtree(root / f"checkpoint-{old}", ignore_errors=True)
    return final


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order="C") for k, v in arrays.items()}, str(path))  # keeps 0-d arrays 0-d


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def install_pipeline_folder(saved: Path, output_dir: str | os.PathLike) -> None:
    """Move a pipeline folder written by ``save_pretrained`` into ``output_dir``, entry by entry.

    ``output_dir`` keeps its other contents (checkpoints, logs); each component is swapped in by one rename
    (:func:`diffusion_core.atomic.swap_into_place`), ``model_index.json`` last.
    """
    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(saved.iterdir(), key=lambda p: p.name == "model_index.json"):  # the index last
        dest = target / entry.name
        if entry.is_dir():
            remove_stale_temporaries(dest)
            old = swap_into_place(entry, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, dest)
    fsync_dir(target)
    shutil.rmtree(saved, ignore_errors=True)
