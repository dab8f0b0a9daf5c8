"""set_timesteps(..., begin_index=k): runs that start mid-schedule (img2img, inpainting) against diffusers.

diffusers' pipelines call ``set_begin_index(k)`` after ``set_timesteps`` and loop over
``timesteps[k:]``; multistep solvers then warm their order up again from call k (no history,
no UniPC corrector at the first executed call) while the "final step" rules count in absolute
steps. Schedulers without a begin index in diffusers (DDPM, DDIM, PNDM) run the slice alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.schedulers import schedule
from tests.schedulers.parity import check_parity, run_ours

# (class name, config, step kwargs): every scheduler, plus the options that change the warm-up
CASES = [
    ("DDPMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 0.5}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min", "euler_at_final": True}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverSinglestepScheduler", {}, {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}, {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "predict_x0": False, "final_sigmas_type": "sigma_min"}, {}),
    ("UniPCMultistepScheduler", {"disable_corrector": [3]}, {}),
    ("DEISMultistepScheduler", {}, {}),
    ("DEISMultistepScheduler", {"solver_order": 3}, {}),
    ("LCMScheduler", {}, {}),
    ("EDMEulerScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]
STEPS = (4, 10, 20)  # 20: past the < 15 steps threshold of lower_order_final
LIKE = np.zeros((1, 2, 2, 2), dtype=np.float32)  # latents-shaped template for the history buffers


def _num_calls(name: str, config, n: int) -> int:
    state = schedulers.from_config({"_class_name": name, **config}).set_timesteps(n, like=LIKE)
    return int(state.timesteps.shape[0])


def _begins(name: str, config, n: int) -> list[int]:
    """0, the first few calls, a middle one and the last call, on the scheduler's order."""
    order = schedulers.get_scheduler_class(name).order
    calls = _num_calls(name, config, n)
    picks = {0, order, 2 * order, 3 * order, (calls // 2) // order * order, (calls - 1) // order * order}
    return sorted(k for k in picks if k < calls)


def _params():
    out = []
    for name, config, kwargs in CASES:
        for n in STEPS:
            for k in _begins(name, config, n):
                cid = ",".join(f"{a}={b}" for a, b in sorted(config.items())) or "defaults"
                out.append(pytest.param(name, config, kwargs, n, k, id=f"{name}-{cid}-n{n}-k{k}"))
    return out


@pytest.mark.parametrize("name,config,step_kwargs,n,begin", _params())
def test_begin_index_matches_diffusers(name, config, step_kwargs, n, begin):
    check_parity(name, config, n, "numpy", step_kwargs, begin=begin)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize(
    "name,config", [("UniPCMultistepScheduler", {"solver_order": 3}), ("DPMSolverSinglestepScheduler", {})]
)
def test_begin_index_backends(name, config, backend):
    check_parity(name, config, 10, backend, begin=3)


def test_lms_begin_keeps_diffusers_absolute_order():
    """diffusers' LMS takes order min(step_index + 1, 4) from the absolute index, but holds only the
    slopes seen since the begin: it zips the 4th-order coefficients with the shorter slope list.
    We match that (the zero history does the truncation); a fresh warm-up would differ."""
    name, n, k = "LMSDiscreteScheduler", 10, 5
    check_parity(name, {}, n, "numpy", begin=k)
    ours, _ = run_ours(name, {}, n, "numpy", begin=k)
    restarted, _ = run_ours(name, {}, n, "numpy", step_kwargs={"order": 1}, begin=k)
    assert not np.allclose(ours, restarted)


def test_begin_zero_is_the_default_state():
    sched = schedulers.from_config({"_class_name": "UniPCMultistepScheduler", "solver_order": 3})
    a, b = sched.set_timesteps(8, LIKE), sched.set_timesteps(8, LIKE, begin_index=0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_begin_sets_counter_and_restarts_warm_up():
    sched = schedulers.from_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})
    full, late = sched.set_timesteps(20, LIKE), sched.set_timesteps(20, LIKE, begin_index=6)
    assert int(late.step_index) == 6
    np.testing.assert_array_equal(late.timesteps, full.timesteps)
    # step 6 is first order from the begin (weights on the newest output only), third order from 0
    assert np.count_nonzero(late.history_coef[6]) == 1 and np.count_nonzero(full.history_coef[6]) == 3
    np.testing.assert_array_equal(late.history_coef[9:], full.history_coef[9:])


def test_multistep_orders_begin():
    np.testing.assert_array_equal(schedule.multistep_orders(8, 3, True, True, begin_index=3), [1, 1, 1, 1, 2, 3, 2, 1])
    np.testing.assert_array_equal(schedule.multistep_orders(8, 3, False, False), [1, 2, 3, 3, 3, 3, 3, 3])


@pytest.mark.parametrize("bad", [-1, 1.0, True, "2", None, 10])
def test_begin_index_rejects_bad_values(bad):
    sched = schedulers.from_config({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="begin_index"):
        sched.set_timesteps(10, begin_index=bad)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_two_stage_begin_must_be_first_stage(name):
    sched = schedulers.from_config({"_class_name": name})
    with pytest.raises(ValueError, match="begin_index: must be a multiple"):
        sched.set_timesteps(10, LIKE, begin_index=3)
    with pytest.raises(ValueError, match="begin_index: must be <"):
        sched.set_timesteps(10, LIKE, begin_index=20)  # 2 * 10 - 1 calls


def test_every_set_timesteps_override_takes_begin_index():
    cases = [
        ("DPMSolverMultistepScheduler", {"use_dynamic_shifting": True, "use_flow_sigmas": True}, {"mu": 0.5}),
        ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"mu": 0.5}),
        ("LCMScheduler", {}, {"strength": 0.5}),
        ("LMSDiscreteScheduler", {}, {"order": 2}),
    ]
    for name, config, extra in cases:
        sched = schedulers.from_config({"_class_name": name, **config})
        state = sched.set_timesteps(8, LIKE, begin_index=2, **extra)
        assert int(state.step_index) == 2, name
        with pytest.raises(ValueError, match="begin_index"):
            sched.set_timesteps(8, LIKE, begin_index=-1, **extra)


def test_lcm_strength_with_begin_matches_diffusers():
    check_parity("LCMScheduler", {}, 8, "numpy", custom={"strength": 0.5}, begin=1)


def test_pndm_prk_rejects_begin():
    sched = schedulers.from_config({"_class_name": "PNDMScheduler"})
    assert int(sched.set_timesteps(10, LIKE, begin_index=0).step_index) == 0
    with pytest.raises(ValueError, match="begin_index: PNDMScheduler with skip_prk_steps=False"):
        sched.set_timesteps(10, LIKE, begin_index=2)
