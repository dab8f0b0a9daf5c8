"""Noise schedulers, written once against the array API (numpy, torch, jax; eager or jitted).

    from diffusion_core import schedulers
    sched = schedulers.from_config({"_class_name": "DDIMScheduler", ...})
    state = sched.set_timesteps(25, like=latents)
    x, state = sched.step(state, model_output, x)

Classes are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from diffusion_core.schedulers.base import SCHEDULER_CONFIG_NAME, AlphaScheduler, Scheduler, _load_config

# diffusers class name -> module under diffusion_core.schedulers
_CLASS_MODULES: dict[str, str] = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_ancestral",
    "DPMSolverMultistepScheduler": "dpm_multistep",
    "DPMSolverSinglestepScheduler": "dpm_singlestep",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
    "LCMScheduler": "lcm",
    "EDMEulerScheduler": "edm_euler",
    "FlowMatchEulerDiscreteScheduler": "flow_match_euler",
    "UnCLIPScheduler": "unclip",
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_CLASS_MODULES)


def get_scheduler_class(name: str) -> type[Scheduler]:
    """The scheduler class for a diffusers class name (e.g. ``"EulerDiscreteScheduler"``)."""
    module = _CLASS_MODULES.get(name)
    if module is None:
        raise ValueError(f"_class_name: unknown scheduler {name!r}; accepted: {sorted(_CLASS_MODULES)}")
    return getattr(importlib.import_module(f"diffusion_core.schedulers.{module}"), name)


def all_scheduler_classes() -> list[type[Scheduler]]:
    """Every scheduler class, in SCHEDULER_NAMES order (imports each module)."""
    return [get_scheduler_class(name) for name in SCHEDULER_NAMES]


def from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> Scheduler:
    """Build the scheduler that ``config["_class_name"]`` names from a dict, JSON path or folder."""
    data = _load_config(config, overrides.pop("subfolder", None))
    name = data.get("_class_name")
    if name is None:
        raise ValueError(
            f"config: has no '_class_name'; name the algorithm, one of {sorted(_CLASS_MODULES)}, "
            "or call <SchedulerClass>.from_config(config)"
        )
    return get_scheduler_class(name).from_config(data, **overrides)


def __getattr__(name: str):
    if name in _CLASS_MODULES:
        return get_scheduler_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SCHEDULER_CONFIG_NAME",
    "SCHEDULER_NAMES",
    "AlphaScheduler",
    "Scheduler",
    "from_config",
    "get_scheduler_class",
    *SCHEDULER_NAMES,
]
