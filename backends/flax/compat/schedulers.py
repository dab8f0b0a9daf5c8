"""diffusers 0.39's Flax scheduler API (``FlaxDDIMScheduler`` & co.) as thin wrappers over our schedulers.

Each class holds one ``diffusion_core.schedulers`` scheduler and maps 0.39's calls onto it:

    scheduler, state = FlaxDDIMScheduler.from_pretrained(path, subfolder="scheduler")
    state = scheduler.set_timesteps(state, 50, latents.shape)
    for t in state.timesteps:
        out = model(scheduler.scale_model_input(state, latents, t), t)
        latents, state = scheduler.step(state, out, t, latents, return_dict=False)

The math is the native scheduler's (and so diffusers' PyTorch numbers); ``step`` follows the
native step counter, and eagerly checks that the ``timestep`` passed is the scheduled one.
Where 0.39 was broken (LMS returned NaN; DDPM's noise draw fails on current JAX) the native,
PyTorch-equivalent behaviour applies.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_core import schedulers


@flax.struct.dataclass
class FlaxSchedulerState:
    """0.39's scheduler state: ``timesteps``, ``init_noise_sigma``, ``num_inference_steps`` over our native state."""

    native: Any  # the wrapped scheduler's state NamedTuple (arrays; fixed shapes from set_timesteps)
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def timesteps(self):
        return self.native.timesteps

    @property
    def init_noise_sigma(self):
        return self.native.init_noise_sigma


@flax.struct.dataclass
class FlaxSchedulerOutput:
    """0.39's ``Flax*SchedulerOutput``: the previous sample and the new state."""

    prev_sample: jnp.ndarray
    state: FlaxSchedulerState


class FlaxSchedulerCompat:
    """Abstract: 0.39's ``FlaxSchedulerMixin`` calls over the native scheduler named by ``_native_name``."""

    _native_name: ClassVar[str]
    # native options whose PyTorch default differs from what 0.39's Flax class did (it had no such option)
    _flax_039_defaults: ClassVar[dict[str, Any]] = {}
    has_state = True

    def __init__(self, dtype: Any = jnp.float32, **config: Any) -> None:
        config = {**self._flax_039_defaults, **config}
        self._wrap(schedulers.get_scheduler_class(self._native_name)(**config), dtype)

    def _wrap(self, native: schedulers.Scheduler, dtype: Any) -> None:
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"dtype: must be a floating dtype (jnp.float32, jnp.bfloat16, ...), got {dtype!r}")
        self.native = native
        self.dtype = jnp.dtype(dtype)

    @classmethod
    def from_native(cls, native: schedulers.Scheduler, dtype: Any = jnp.float32):
        """Wrap an existing native scheduler (its config is kept as is)."""
        if type(native).__name__ != cls._native_name:
            raise ValueError(f"native: {cls.__name__} wraps a {cls._native_name}, got {type(native).__name__}")
        obj = cls.__new__(cls)
        obj._wrap(native, dtype)
        return obj

    @classmethod
    def from_config(cls, config: Any = None, dtype: Any = jnp.float32, **overrides: Any):
        """Build from a dict, a ``scheduler_config.json`` path or a folder (0.39 and native configs alike)."""
        if isinstance(config, dict):  # a dict written for 0.39's Flax class lacks the newer options
            overrides = {**{k: v for k, v in cls._flax_039_defaults.items() if k not in config}, **overrides}
        native = schedulers.get_scheduler_class(cls._native_name).from_config(config, **overrides)
        return cls.from_native(native, dtype)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        **overrides: Any,
    ):
        """``(scheduler, state)`` from a folder holding ``scheduler_config.json`` (as 0.39 returned)."""
        scheduler = cls.from_config(pretrained_model_name_or_path, dtype=dtype, subfolder=subfolder, **overrides)
        return scheduler, scheduler.create_state()

    @property
    def config(self):
        return self.native.config

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any):
        """Write ``scheduler_config.json`` with the native class name (what both backends load)."""
        return self.native.save_config(save_directory)

    save_config = save_pretrained

    def _like(self, shape: tuple[int, ...]):
        return jnp.zeros(tuple(shape), dtype=self.dtype)

    def create_state(self, common: Any = None) -> FlaxSchedulerState:
        """A state over the full training schedule, timesteps T-1..0 (0.39's values before ``set_timesteps``).

        0.39 ignored ``steps_offset`` here (an offset would push T steps past the table), so do we.
        """
        T = int(self.native.options["num_train_timesteps"])
        full = self.native
        if self.native.options.get("steps_offset"):
            full = type(self.native).from_config(self.native.config, steps_offset=0)
        return FlaxSchedulerState(native=full.set_timesteps(T, like=self._like(())))

    def set_timesteps(
        self, state: FlaxSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> FlaxSchedulerState:
        """A fresh state for ``num_inference_steps``; ``shape`` (the latents') sizes the history buffers."""
        if not isinstance(state, FlaxSchedulerState):
            raise ValueError(f"state: expected the FlaxSchedulerState from create_state(), got {type(state).__name__}")
        native = self.native.set_timesteps(num_inference_steps, like=self._like(shape))
        return state.replace(native=native, num_inference_steps=int(num_inference_steps))

    def scale_model_input(self, state: FlaxSchedulerState, sample, timestep=None):
        """The model input at this step (sigma schedulers divide by sqrt(sigma^2 + 1))."""
        return self.native.scale_model_input(state.native, sample)

    def _check_timestep(self, state: FlaxSchedulerState, timestep) -> None:
        """Eagerly, ``timestep`` must be the one scheduled at the state's step counter (0.39 looked it up)."""
        if timestep is None or isinstance(timestep, jax.core.Tracer):
            return
        index = state.native.step_index
        if isinstance(index, jax.core.Tracer) or int(index) >= state.timesteps.shape[0]:
            return
        expected = state.timesteps[int(index)]
        if not bool(jnp.all(jnp.asarray(timestep) == expected)):
            raise ValueError(
                f"timestep: {timestep!r} is not the scheduled timestep {expected!r} at step {int(index)}; "
                "call step once per entry of state.timesteps, in order"
            )

    def _noise(self, key, shape: tuple[int, ...]):
        return None

    def step(
        self,
        state: FlaxSchedulerState,
        model_output,
        timestep,
        sample,
        key: Any = None,
        return_dict: bool = True,
        **step_kwargs: Any,
    ):
        """One step: ``FlaxSchedulerOutput(prev_sample, state)``, or the tuple with ``return_dict=False``."""
        if state.native.timesteps.shape[0] == 0:
            raise ValueError("state: call set_timesteps(state, num_inference_steps, shape) before step")
        self._check_timestep(state, timestep)
        noise = self._noise(key, tuple(sample.shape))
        prev, native = self.native.step(state.native, model_output, sample, noise=noise, **step_kwargs)
        new_state = state.replace(native=native)
        if not return_dict:
            return prev, new_state
        return FlaxSchedulerOutput(prev_sample=prev, state=new_state)

    def add_noise(self, state: FlaxSchedulerState, original_samples, noise, timesteps):
        """Forward-diffuse ``original_samples`` to ``timesteps`` (the native ``add_noise``)."""
        return self.native.add_noise(original_samples, noise, timesteps, state=state.native)

    def get_velocity(self, state: FlaxSchedulerState, sample, noise, timesteps):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (alpha-table schedulers)."""
        return self.native.get_velocity(sample, noise, timesteps)

    def __len__(self) -> int:
        return int(self.native.options["num_train_timesteps"])


class FlaxDDIMScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxDDIMScheduler`` over ``DDIMScheduler``; ``step(..., eta=0.0)`` as in 0.39."""

    _native_name = "DDIMScheduler"

    def step(self, state, model_output, timestep, sample, eta: float = 0.0, return_dict: bool = True):
        if eta != 0:  # 0.39's Flax DDIM ignored eta's noise term entirely; refuse rather than differ
            raise ValueError(f"eta: FlaxDDIMScheduler.step supports eta=0.0 only (as 0.39 computed it), got {eta!r}")
        return super().step(state, model_output, timestep, sample, return_dict=return_dict)


class FlaxDDPMScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxDDPMScheduler`` over ``DDPMScheduler``: noise ``normal(split(key, 1)[0])``, key default key(0)."""

    _native_name = "DDPMScheduler"

    def _noise(self, key, shape):
        key = jax.random.key(0) if key is None else key
        return jax.random.normal(jax.random.split(key, num=1)[0], shape=shape, dtype=self.dtype)


class FlaxPNDMScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxPNDMScheduler`` over ``PNDMScheduler`` (PRK then PLMS calls, one per state.timesteps entry)."""

    _native_name = "PNDMScheduler"


class FlaxLMSDiscreteScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxLMSDiscreteScheduler`` over ``LMSDiscreteScheduler`` (jittable; finite where 0.39 gave NaN)."""

    _native_name = "LMSDiscreteScheduler"


class FlaxDPMSolverMultistepScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxDPMSolverMultistepScheduler`` over ``DPMSolverMultistepScheduler``."""

    _native_name = "DPMSolverMultistepScheduler"
    # 0.39's Flax step ended at the smallest training sigma, not at 0 (checked against 0.39 in test_oracle_039)
    _flax_039_defaults = {"final_sigmas_type": "sigma_min"}


class FlaxEulerDiscreteScheduler(FlaxSchedulerCompat):
    """0.39's ``FlaxEulerDiscreteScheduler`` over ``EulerDiscreteScheduler``."""

    _native_name = "EulerDiscreteScheduler"


SCHEDULER_CLASSES: tuple[type[FlaxSchedulerCompat], ...] = (
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxPNDMScheduler,
    FlaxLMSDiscreteScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerDiscreteScheduler,
)
