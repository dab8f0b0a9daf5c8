"""LoRA training, written once: which layers get adapters, their initial factors, and the trained file.

The adapters are the inference ones of ``diffusion_core.pipelines.lora`` (a stacked ``LoraPack`` per layer,
installed by each backend's ``lora`` module) with their two factors made trainable and everything else frozen.
Initialisation is PEFT's: ``lora_A`` (down) Kaiming-uniform with ``a = sqrt(5)`` (bound ``1 / sqrt(in)``),
``lora_B`` (up) zero, so training starts from the base model. The result is written by
``diffusion_core.weights.lora.save_lora`` in diffusers' PEFT layout, which diffusers' ``load_lora_weights`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffusion_core.pipelines.lora import LoraPack
from diffusion_core.weights.lora import LoraLayer

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py targets
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # its --train_text_encoder targets


@dataclass(frozen=True)
class LoraTrainConfig:
    """Which adapters a LoRA run trains (frozen, JSON-serialisable)."""

    rank: int = 4  # columns of each low-rank pair
    alpha: float | None = None  # update scale alpha / rank; None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = UNET_ATTENTION  # UNet Linear layers whose path ends with one of these

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise ValueError(f"lora alpha must be a number > 0 or None, got {self.alpha!r}")
        names = self.target_modules
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"target_modules must be a non-empty tuple of module names, got {names!r}")
        object.__setattr__(self, "target_modules", tuple(names))

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_paths(shapes: Mapping[str, tuple[int, ...]], config: LoraTrainConfig) -> list[str]:
    """The Linear layers (PyTorch weight shape (out, in)) among ``shapes`` whose path ends with a target name."""
    suffixes = tuple("." + n for n in config.target_modules)
    paths = sorted(p for p, shape in shapes.items() if ("." + p).endswith(suffixes) and len(shape) == 2)
    if not paths:
        raise ValueError(f"target_modules: no Linear layer ends with any of {list(config.target_modules)}")
    return paths


def init_layers(shapes: Mapping[str, tuple[int, ...]], config: LoraTrainConfig, seed: int) -> dict[str, LoraLayer]:
    """Fresh adapters for the target layers: down Kaiming-uniform (from ``seed``), up zero. PyTorch layout."""
    rng = np.random.default_rng([seed, 7])
    layers = {}
    for path in target_paths(shapes, config):
        out_features, in_features = shapes[path]
        bound = 1.0 / np.sqrt(in_features)
        down = rng.uniform(-bound, bound, (config.rank, in_features)).astype(np.float32)  # (R, in)
        layers[path] = LoraLayer(down, np.zeros((out_features, config.rank), np.float32), config.scale)  # up (out, R)
    return layers


def packs(layers: Mapping[str, LoraLayer]) -> dict[str, LoraPack]:
    """One adapter per layer as the backends install it: column scales ``alpha / rank``."""
    return {
        p: LoraPack(x.down, x.up, np.full(x.rank, x.scale, np.float32)) for p, x in layers.items()
    }  # fmt: skip


def with_factors(layers: Mapping[str, LoraLayer], factors: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """``layers`` with trained ``(down, up)`` factors (PyTorch layout) in place of the initial ones."""
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(f"factors: no adapter at {unknown}")
    return {
        p: LoraLayer(np.asarray(factors[p][0], np.float32), np.asarray(factors[p][1], np.float32), x.scale)
        for p, x in layers.items()
    }


def check_resumed(layers: Mapping[str, LoraLayer], expected: Mapping[str, LoraLayer], source: Any) -> None:
    """A checkpoint's adapters must be this run's: the same layers, ranks and scales."""
    same = set(layers) == set(expected) and all(
        layers[p].rank == x.rank and np.isclose(layers[p].scale, x.scale) for p, x in expected.items()
    )
    if not same:
        raise ValueError(f"resume: {source} holds other adapters (layers, rank or alpha) than this run trains")
