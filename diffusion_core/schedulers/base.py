"""The scheduler contract: an immutable config plus pure functions over an explicit state.

A scheduler object holds only its frozen, JSON-serialisable config and host-side float64
training tables. Everything that evolves while sampling lives in a state NamedTuple (arrays
only, shapes and dtypes fixed by ``set_timesteps``), so ``step`` is a pure transition that
runs eagerly on numpy/torch/jax arrays or as the body of one ``jax.lax.scan``.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffusion_core import arrays
from diffusion_core.configuration import (
    DIFFUSERS_FORMAT_VERSION,
    FrozenConfig,
    config_to_json_string,
    read_json_config,
    to_json_value,
    write_json_atomic,
)
from diffusion_core.schedulers import common, schedule

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
USE_DEFAULT_VALUES = "_use_default_values"  # diffusers' in-memory list of options left at default

# Accepted values of the enumerated options, shared by every scheduler that has the option.
COMMON_CHOICES: dict[str, tuple] = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
    "final_sigmas_type": ("zero", "sigma_min"),
}

_WARNED_KEYS: set[tuple[str, str]] = set()


def known_config_keys() -> set[str]:
    """Every option of every scheduler here (keys another scheduler's config may carry)."""
    from diffusion_core.schedulers import all_scheduler_classes

    return {k for cls in all_scheduler_classes() for k in cls._defaults}


class Scheduler(abc.ABC):
    """Abstract base: config handling and the public call shapes. Subclasses are final."""

    _defaults: ClassVar[Mapping[str, Any]]  # every diffusers __init__ option and its default
    _choices: ClassVar[Mapping[str, tuple]] = {}  # per-class enumerations beyond COMMON_CHOICES
    _extra_beta_schedules: ClassVar[tuple[str, ...]] = ()
    # values diffusers silently rewrites on load (e.g. DPM maps algorithm_type "deis" to "dpmsolver++")
    _aliases: ClassVar[Mapping[str, Mapping[Any, Any]]] = {}
    order: ClassVar[int] = 1  # model calls per solver step (Heun/KDPM2: 2), as in diffusers
    accepts_timesteps: ClassVar[bool] = False  # set_timesteps(timesteps=[...]) supported
    accepts_sigmas: ClassVar[bool] = False  # set_timesteps(sigmas=[...]) supported
    # keyword options ``step`` takes beyond the sample and noise (DDIM: eta); pipelines pass only these
    step_options: ClassVar[frozenset[str]] = frozenset()
    # continuous-time schedulers (EDM, flow matching) sample any number of steps
    steps_bounded_by_training: ClassVar[bool] = True
    # multistep solvers warm their order up again from the first executed call: their per-step
    # tables depend on it, and their ``_make_state`` takes ``begin_index=`` (the first call's index)
    tables_depend_on_begin_index: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown option(s) {unknown}; accepted: {sorted(self._defaults)}")
        self._init_from(dict(config), extra={})

    def _init_from(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        full = {k: to_json_value(v) for k, v in self._defaults.items()}
        full.update({k: to_json_value(v) for k, v in config.items()})
        for key, renames in self._aliases.items():
            if key in full and isinstance(full[key], str) and full[key] in renames:
                full[key] = renames[full[key]]
        self._check_config(full)
        # like diffusers: remember which options took their defaults, so that a swap to another
        # class (from_config) lets that class apply its own defaults; never saved to JSON
        defaulted = sorted(set(self._defaults) - set(config))
        marker = {USE_DEFAULT_VALUES: defaulted} if defaulted else {}
        self._config = FrozenConfig({**extra, **full, **marker})
        self._options = FrozenConfig(full)  # this class's options only: what the math reads
        self._setup()

    # ----- config ---------------------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        """The frozen config: every option of this class plus keys kept from a swapped config."""
        return self._config

    @property
    def options(self) -> FrozenConfig:
        """This class's own options (``config`` less the keys kept from a swapped config).

        The math reads only these, so a foreign key (DDPM's ``clip_sample`` carried into
        DPM-Solver's config by a swap) is kept for swapping back but never acted on, as in diffusers.
        """
        return self._options

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any):
        """Build from a dict, a ``scheduler_config.json`` path or a folder holding one.

        Keys this class does not use are kept in ``config`` (so a swap back restores them);
        keys no scheduler knows are also kept, with a warning once per key.
        """
        data = _load_config(config, overrides.pop("subfolder", None))
        bad = sorted(set(overrides) - set(cls._defaults))
        if bad:
            raise ValueError(f"{cls.__name__}: unknown option(s) {bad}; accepted: {sorted(cls._defaults)}")
        data.update(overrides)
        defaulted = set(data.pop(USE_DEFAULT_VALUES, None) or ())
        data = {k: v for k, v in data.items() if k not in defaulted}
        source = data.pop("_class_name", cls.__name__)
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        init = {k: v for k, v in data.items() if k in cls._defaults}
        extra = {k: v for k, v in data.items() if k not in cls._defaults}
        strangers = sorted(set(extra) - known_config_keys())
        for key in strangers:
            if (cls.__name__, key) not in _WARNED_KEYS:
                _WARNED_KEYS.add((cls.__name__, key))
                logger.warning(
                    "%s: config key %r (from %s) is not a scheduler option; it is kept in config but unused",
                    cls.__name__,
                    key,
                    source,
                )
        obj = cls.__new__(cls)
        obj._init_from(init, extra)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it, with ``_class_name`` and ``_diffusers_version``."""
        saved = {k: v for k, v in self._config.items() if k != USE_DEFAULT_VALUES}
        return {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_FORMAT_VERSION, **saved}

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``scheduler_config.json`` (diffusers' bytes: sorted keys, indent 2), atomically."""
        path = Path(save_directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"save_directory: {str(path)!r} exists and is not a folder")
        target = path / SCHEDULER_CONFIG_NAME
        write_json_atomic(target, config_to_json_string(self.to_dict()))
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._config)})"

    def _check_config(self, config: dict[str, Any]) -> None:
        """Raise ValueError for invalid option values (subclasses extend, calling super)."""
        for key, default in self._defaults.items():
            _check_option_type(type(self).__name__, key, config.get(key, default), default)
        choices = {**COMMON_CHOICES, **self._choices}
        for key, accepted in choices.items():
            if key in config and config[key] not in accepted:
                raise ValueError(
                    f"{type(self).__name__}: {key}={config[key]!r} is not accepted; accepted: {list(accepted)}"
                )
        if "beta_schedule" in config and config.get("trained_betas") is None:
            accepted = schedule.BETA_SCHEDULES + self._extra_beta_schedules
            if config["beta_schedule"] not in accepted:
                raise ValueError(
                    f"{type(self).__name__}: beta_schedule={config['beta_schedule']!r} is not accepted; "
                    f"accepted: {list(accepted)} (or pass trained_betas)"
                )
        ladders = [k for k in schedule.SIGMA_LADDERS if config.get(k)]
        if len(ladders) > 1:
            raise ValueError(
                f"{type(self).__name__}: {' and '.join(ladders)} are mutually exclusive; set at most one to True"
            )
        T = config.get("num_train_timesteps")
        if T is not None and (not isinstance(T, int) or T < 1):
            raise ValueError(f"{type(self).__name__}: num_train_timesteps must be an int >= 1, got {T!r}")

    def _setup(self) -> None:
        """Precompute host-side float64 tables from the config (training schedule)."""

    # ----- sampling API ---------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        like: Any = None,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
        begin_index: int = 0,
    ):
        """A fresh state for ``num_inference_steps`` (or custom ``timesteps=``/``sigmas=``).

        ``like``: an array shaped and typed as the latents; the state lives in its framework,
        device and dtype (``None``: numpy float32). ``begin_index``: the model call the run starts
        at (img2img / inpainting: ``t_start * order``, diffusers' ``set_begin_index``); the
        counter starts there and multistep solvers warm up again from it.
        """
        n, timesteps, sigmas = self._resolve_request(num_inference_steps, timesteps, sigmas)
        return self._build_state(n, like, begin_index, timesteps=timesteps, sigmas=sigmas)

    def _build_state(self, n: int, like: Any, begin_index: Any, **make_kwargs: Any):
        """``_make_state(n, like, **make_kwargs)`` for a run starting at model call ``begin_index``."""
        begin_index = check_begin_index(begin_index)
        if self.tables_depend_on_begin_index:
            make_kwargs["begin_index"] = begin_index
        state = self._make_state(n, like, **make_kwargs)
        check_begin_index(begin_index, int(state.timesteps.shape[0]), self.order)
        return state._replace(step_index=arrays.counter_like(like, begin_index)) if begin_index else state

    def noise_calls(self, state, **step_kwargs: Any) -> np.ndarray:
        """(num_calls,) bool, host-side: True at the model calls where diffusers' ``step`` draws noise.

        A loop that shares one random generator with diffusers draws exactly at these calls (and
        passes ``noise=None`` elsewhere), so the two generator streams stay aligned.
        """
        return np.full(int(state.timesteps.shape[0]), bool(self.needs_noise_for(**step_kwargs)))

    def _resolve_request(self, num_inference_steps: Any, timesteps: Any, sigmas: Any):
        """Validate a set_timesteps request: ``(n, timesteps, sigmas)``, custom ones as float64.

        Subclasses whose ``set_timesteps`` takes extra keywords (LCM's ``strength``) call this
        and then ``_build_state`` with the extras (passed on to their ``_make_state``).
        """
        name = type(self).__name__
        if timesteps is not None and not self.accepts_timesteps:
            raise ValueError(f"timesteps: {name} does not accept custom timesteps")
        if sigmas is not None and not self.accepts_sigmas:
            raise ValueError(f"sigmas: {name} does not accept custom sigmas")
        if timesteps is not None and sigmas is not None:
            raise ValueError("timesteps, sigmas: pass at most one of them")
        if timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.float64)
            if timesteps.ndim != 1 or timesteps.size < 1 or np.any(np.diff(timesteps) >= 0):
                raise ValueError("timesteps: must be a non-empty 1-D sequence in strictly descending order")
            num_inference_steps = timesteps.size
        elif sigmas is not None:
            sigmas = np.asarray(sigmas, dtype=np.float64)
            if sigmas.ndim != 1 or sigmas.size < 1:
                raise ValueError("sigmas: must be a non-empty 1-D sequence")
            num_inference_steps = sigmas.size
        else:
            self._check_num_steps(num_inference_steps)
        return int(num_inference_steps), timesteps, sigmas

    def _check_num_steps(self, n: Any) -> None:
        T = self._options.get("num_train_timesteps") if self.steps_bounded_by_training else None
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or (T is not None and n > T):
            bound = f" and <= num_train_timesteps ({T})" if T is not None else ""
            raise ValueError(f"num_inference_steps: must be an int >= 1{bound}, got {n!r}")

    @abc.abstractmethod
    def _make_state(self, n: int, like: Any, *, timesteps: Any = None, sigmas: Any = None):
        """Build the state for ``n`` steps (custom timesteps/sigmas already validated)."""

    def current_timestep(self, state):
        """The timestep to feed the model at this step."""
        return state.timesteps[state.step_index]

    def scale_model_input(self, state, sample):
        """Scale the model input for this step (identity unless the scheduler is sigma-based)."""
        return sample

    @abc.abstractmethod
    def step(self, state, model_output, sample, noise=None, **kwargs):
        """One solver step: returns ``(prev_sample, new_state)``; pure."""

    @abc.abstractmethod
    def add_noise(self, original_samples, noise, timesteps, state=None):
        """Forward-diffuse ``original_samples`` to ``timesteps`` with the given ``noise``."""

    @property
    def needs_noise(self) -> bool:
        """True where ``step`` (default keywords) consumes a fresh Gaussian draw; a property on every scheduler."""
        return False

    def needs_noise_for(self, **step_kwargs: Any) -> bool:
        """Whether ``step(..., **step_kwargs)`` consumes ``noise`` (e.g. DDIM only with eta > 0)."""
        return self.needs_noise

    def _require_noise(self, noise, why: str):
        if noise is None:
            raise ValueError(f"noise: {type(self).__name__}.step needs a Gaussian `noise` array ({why})")
        return noise

    def _noise_unless_unused(self, noise, weight, why: str):
        """``noise``; ``None`` is accepted only at a call whose noise ``weight`` (0-d) is zero, i.e. where
        ``noise_calls`` is False (one host read of ``weight``, at those calls only)."""
        if noise is not None:
            return noise
        try:
            unused = bool(weight == 0)
        except Exception:  # a traced weight (jax.jit / scan): unknown here, so the noise is required
            unused = False
        if not unused:
            self._require_noise(noise, f"{why}; see noise_calls(state) for the calls that draw")
        return None


def _check_option_type(owner: str, key: str, value: Any, default: Any) -> None:
    """An option keeps the kind of its default: bool, int, number (int or float, not NaN) or str; options
    whose default is None take anything their class checks itself, except ``trained_betas`` (numbers)."""
    if default is None:
        if key == "trained_betas" and value is not None:
            is_numbers = isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
            if not is_numbers or not all(
                isinstance(b, (int, float, np.number)) and not isinstance(b, bool) for b in value
            ):
                raise ValueError(f"{owner}: trained_betas must be None or a non-empty list of numbers, got {value!r}")
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif isinstance(default, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok, kind = number and value == value, "a number"  # value == value: not NaN
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a str"
    else:
        return
    if not ok:
        raise ValueError(f"{owner}: {key} must be {kind}, got {value!r}")


def check_begin_index(begin_index: Any, num_calls: int | None = None, order: int = 1) -> int:
    """``begin_index`` as an int; ValueError unless 0 <= it < ``num_calls`` and on a multiple of ``order``.

    Two-stage solvers (Heun, KDPM2: order 2) start on a first-stage call, as ``t_start * order`` is.
    """
    if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
        raise ValueError(f"begin_index: must be an int >= 0, got {begin_index!r}")
    begin_index = int(begin_index)
    if num_calls is not None and begin_index >= num_calls:
        raise ValueError(f"begin_index: must be < the number of model calls ({num_calls}), got {begin_index}")
    if begin_index % order:
        raise ValueError(f"begin_index: must be a multiple of the scheduler's order ({order}), got {begin_index}")
    return begin_index


def host_values(values: Any) -> np.ndarray:
    """A state table as a float64 numpy array (from numpy, torch on any device, or jax)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def _load_config(config: Any, subfolder: str | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_json_config(config, SCHEDULER_CONFIG_NAME, subfolder)
    raise ValueError(
        f"config: expected a dict, a path to {SCHEDULER_CONFIG_NAME} or a folder, got {type(config).__name__}"
    )


class AlphaScheduler(Scheduler):
    """Abstract: schedulers defined by a discrete alphas_cumprod table (DDPM family)."""

    # diffusers floors a zero-SNR alpha_bar[-1] at 2**-24 in the solvers that take log(sigma)
    _floors_zero_snr: ClassVar[bool] = False

    def _setup(self) -> None:
        # The training table exactly as diffusers holds it (float32 betas and alpha_bar): the numbers
        # the models were trained with, whose rounding fixes sigma_min and where sigma_to_t timesteps
        # truncate. Every inference schedule built on it is float64 (see schedule.alphas_cumprod_float32).
        betas32 = self._betas_float32()
        self.betas = betas32.astype(np.float64)
        self.alphas_cumprod = schedule.alphas_cumprod_float32(betas32)
        if self._floors_zero_snr and self._options.get("rescale_betas_zero_snr"):
            self.alphas_cumprod = schedule.floor_zero_snr(self.alphas_cumprod)

    def _betas_float32(self) -> np.ndarray:
        """The (T,) float32 training betas this config describes, as diffusers builds them."""
        return schedule.betas_float32(self._options, self._extra_beta_schedules)

    def _alpha_sigma_at(self, timesteps, like):
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) gathered at integer ``timesteps``."""
        xp = arrays.namespace(like)
        t = arrays.as_index_array(timesteps, like)
        acp = arrays.host_to_like(self.alphas_cumprod, like)
        a = acp[xp.astype(t, xp.int32)]
        return xp.sqrt(a), xp.sqrt(1 - a)

    def add_noise(self, original_samples, noise, timesteps, state=None):
        """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self._alpha_sigma_at(timesteps, original_samples)
        nd = original_samples.ndim
        return arrays.broadcast_left(alpha, nd) * original_samples + arrays.broadcast_left(sigma, nd) * noise

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, v-prediction)."""
        alpha, sigma = self._alpha_sigma_at(timesteps, sample)
        nd = sample.ndim
        return arrays.broadcast_left(alpha, nd) * noise - arrays.broadcast_left(sigma, nd) * sample


class LevelAlphaScheduler(AlphaScheduler):
    """Abstract: alpha-table solvers whose state holds their own noise levels (DPM-Solver, UniPC, DEIS)."""

    def add_noise(self, original_samples, noise, timesteps, state=None):
        """alpha_t x_0 + sigma_t noise; with ``state``, at the scheduled noise level of the nearest timestep.

        Without a state, VP models use the training table (``AlphaScheduler.add_noise``), flow models the level t / T.
        """
        flow = bool(self.options["use_flow_sigmas"])
        if state is None and not flow:
            return super().add_noise(original_samples, noise, timesteps)
        T = self.options["num_train_timesteps"]
        return common.level_add_noise(original_samples, noise, timesteps, state, flow, T)
