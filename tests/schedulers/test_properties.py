"""Property tests (hypothesis) over scheduler configs and calls: any config, step count or input either
works or raises the documented ValueError (naming the option) — never another exception."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_core import schedulers

NAMES = schedulers.SCHEDULER_NAMES
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.floats(-2.0, 2.0), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _option_values(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """A config: each option kept at its default, set to another class's typical value, or garbage."""
    defaults = schedulers.get_scheduler_class(name)._defaults

    def value(default: Any) -> st.SearchStrategy[Any]:
        similar = st.just(default)
        if isinstance(default, bool):
            similar = st.booleans()
        elif isinstance(default, int):
            similar = st.integers(0, 1100)
        elif isinstance(default, float):
            similar = st.floats(0.0, 2.0)
        elif isinstance(default, str):
            similar = st.sampled_from(
                [
                    default,
                    "linear",
                    "scaled_linear",
                    "squaredcos_cap_v2",
                    "epsilon",
                    "v_prediction",
                    "sample",
                    "leading",
                    "trailing",
                    "linspace",
                    "bogus",
                ]
            )
        return st.one_of(st.just(default), similar, GARBAGE)

    return st.fixed_dictionaries({}, optional={k: value(v) for k, v in defaults.items()})


def _build(name: str, config: dict[str, Any]) -> Any:
    try:
        return schedulers.get_scheduler_class(name)(**config)
    except ValueError as e:
        assert str(e), name  # a message, naming what is wrong
        return None


@pytest.mark.parametrize("name", NAMES)
def test_any_config_builds_or_raises_value_error(name):
    @SETTINGS
    @given(config=_option_values(name))
    def check(config):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _build(name, config)

    check()


@pytest.mark.parametrize("name", NAMES)
def test_any_step_count_and_input_runs_or_raises_value_error(name):
    @SETTINGS
    @given(
        steps=st.one_of(st.integers(-2, 40), st.floats(-1.0, 30.0), st.none(), st.text(max_size=3)),
        scale=st.floats(-1e3, 1e3, allow_nan=False),
        seed=st.integers(0, 2**16),
    )
    def check(steps, scale, seed):
        sched = schedulers.get_scheduler_class(name)()
        x = np.random.default_rng(seed).standard_normal((1, 2, 4, 4)).astype(np.float32)
        try:
            state = sched.set_timesteps(steps, like=x)
        except ValueError as e:
            assert str(e)
            return
        assert isinstance(steps, int) and steps >= 1  # nothing else may pass
        for _ in range(min(3, len(state.timesteps))):
            noise = np.zeros_like(x) if sched.needs_noise else None
            x, state = sched.step(state, scale * x, sched.scale_model_input(state, x), noise=noise)
        assert x.shape == (1, 2, 4, 4) and x.dtype == np.float32

    check()
