"""Learning-rate schedules and the EMA decay rule, as pure functions of the optimisation step.

Both trainers call these with the step about to be taken, so a resumed run reproduces the
uninterrupted run's rates and decays exactly (no scheduler objects with hidden counters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "linear", "cosine")


def learning_rate(step: int, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Rate for optimisation step ``step`` (0-based): linear warm-up over ``warmup_steps``, then ``schedule``.

    ``constant`` keeps ``base_lr``; ``linear`` decays to 0 at ``total_steps``; ``cosine`` follows half a
    cosine to 0 at ``total_steps`` (diffusers' ``get_scheduler`` shapes).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EMAConfig:
    """diffusers' ``EMAModel`` options; the defaults are its defaults with warm-up on (its training scripts)."""

    max_decay: float = 0.9999  # diffusers' ``decay``: the ceiling
    min_decay: float = 0.0  # the floor
    update_after_step: int = 0  # no averaging (decay 0: copy) before this many optimisation steps
    use_ema_warmup: bool = True  # warm-up 1 - (1 + step / inv_gamma) ** -power; else (1 + step) / (10 + step)
    inv_gamma: float = 1.0
    power: float = 2 / 3  # 2/3 suits runs of ~100k steps; 3/4 shorter ones


def ema_decay(optimization_step: int, cfg: EMAConfig) -> float:
    """Decay applied after optimisation step ``optimization_step`` (1-based, as diffusers counts it).

    ``ema = decay * ema + (1 - decay) * params``; decay 0 copies the parameters.
    """
    step = max(0, optimization_step - cfg.update_after_step - 1)
    if step <= 0:
        return 0.0
    if cfg.use_ema_warmup:
        value = 1 - (1 + step / cfg.inv_gamma) ** -cfg.power
    else:
        value = (1 + step) / (10 + step)
    return max(cfg.min_decay, min(value, cfg.max_decay))
