"""``TrainConfig``: the hyperparameters both trainers read (frozen, JSON-serialisable, checked once)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffusion_core.training.objectives import check_prediction_type
from diffusion_core.training.schedules import LR_SCHEDULES, EMAConfig

MIXED_PRECISION = ("no", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings; ``steps`` and folders are arguments of ``fit``, not part of the recipe."""

    batch_size: int = 64  # examples per optimisation step (all devices, all accumulation micro-batches)
    learning_rate: float = 1e-3  # peak rate, reached after warm-up
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the run's last step)
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled decay
    max_grad_norm: float | None = 1.0  # global-norm clipping; None turns it off
    gradient_accumulation_steps: int = 1  # micro-batches per step; batch_size must divide evenly
    prediction_type: str | None = None  # None: the noise scheduler's prediction_type
    snr_gamma: float | None = None  # min-SNR-gamma weighting (5.0 is the paper's choice); None: plain MSE
    ema: EMAConfig | None = field(default_factory=EMAConfig)  # None: no EMA copy
    mixed_precision: str = "no"  # "bf16": compute in bfloat16, float32 master weights
    class_dropout: float = 0.0  # class-conditional: share of labels trained as "no class" (guidance); 0.1 is usual
    seed: int = 0  # data order, timesteps, noise and initial weights all follow from it

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.prediction_type is not None:
            check_prediction_type(self.prediction_type)
        if isinstance(self.class_dropout, bool) or not (
            isinstance(self.class_dropout, (int, float)) and 0.0 <= self.class_dropout < 1.0
        ):
            raise ValueError(f"class_dropout must be a number in [0, 1), got {self.class_dropout!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        if values.get("ema") is not None:
            values["ema"] = EMAConfig(**values["ema"])
        return cls(**values)
