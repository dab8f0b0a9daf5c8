"""PNDM: pseudo numerical methods (Liu et al. 2022, arXiv 2202.09778): RK warm-up, then PLMS.

diffusers picks Runge-Kutta (PRK) or linear multistep (PLMS) by a hidden call counter and keeps
its history in Python lists. Here the host replays that counter once in ``_make_state``: every
update is linear in the current sample and past model outputs, so each call becomes one row of
weights over ``(sample, slots..., model_output)``. Samples diffusers saves (the start of an RK
step) are rebuilt from the current sample and the stored outputs instead of being carried.

Slots (fixed-size history, one array each, so shifting copies nothing):
  ``h1..h3``: the last 3 PLMS outputs. A call either pushes its output or, where diffusers keeps
  its list unchanged, re-pushes a slot (PRK: rotate h1 to the back; skip_prk_steps: repeat h3).
  ``w1, w2`` (PRK only): the last 2 outputs of any call, for the RK stages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from diffusion_core import arrays
from diffusion_core.schedulers import schedule
from diffusion_core.schedulers.base import AlphaScheduler, check_begin_index

# Adams-Bashforth weights on (newest, ..., oldest) outputs, by history length (PNDM paper, eq. 12)
_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_RK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # classic RK4 stage weights (PNDM paper, eq. 13)


class PNDMState(NamedTuple):
    timesteps: Any  # (n_calls,) int: the model's timestep at each call (PRK repeats entries)
    coefs: Any  # (n_calls, n_slots + 4) x_prev = c0 sample + sum_k c_k slot_k + c_out model_output; then
    #            the push flag as weights (1, 0): the output enters h3, (0, 1): a slot is re-pushed
    slots: Any  # tuple of n_slots (*shape) arrays: h1, h2, h3 (oldest first) [, w1, w2]
    step_index: Any  # () int32 counter
    init_noise_sigma: Any  # () 1.0


def _diffusers_calls(timesteps: np.ndarray, n_prk: int, T: int, n: int) -> list[dict[str, Any]]:
    """Replay diffusers' PRK/PLMS counter: per call, (t, t_prev), the output mix and the sample source.

    A mix maps a call index to its weight (of that call's model output); "source" is "x" (the
    current sample) or the call whose input sample diffusers saved and steps from instead.
    """
    calls, ets = [], []  # ets: call indices in diffusers' list
    for c, t in enumerate(int(v) for v in timesteps):
        if c < n_prk:  # RK4 stage c % 4 of the step starting at timesteps[c // 4 * 4]
            stage, start = c % 4, c - c % 4
            mix = {start + k: _RK_WEIGHTS[k] for k in range(4)} if stage == 3 else {c: 1.0}
            ets += [c] if stage == 0 else []
            calls.append(
                dict(
                    t=int(timesteps[start]),
                    t_prev=t - (0 if c % 2 else T // n // 2),
                    mix=mix,
                    source="x" if stage == 0 else start,
                    push=stage == 0,
                )
            )
        elif c == 1:  # skip_prk_steps' second call: a Heun-like correction of the first step
            calls.append(dict(t=t + T // n, t_prev=t, mix={c: 0.5, 0: 0.5}, source=0, push=False))
        else:
            ets = ets[-3:] + [c]
            weights = _PLMS_WEIGHTS[len(ets)]
            mix = {j: w for j, w in zip(reversed(ets), weights, strict=True)}
            calls.append(dict(t=t, t_prev=t - T // n, mix=mix, source="x", push=True))
    return calls


def _slot_plan(calls: list[dict[str, Any]], skip_prk: bool) -> list[list[int | None]]:
    """Which call's output each slot holds before each call (None: empty)."""
    slots: list[int | None] = [None] * (3 if skip_prk else 5)
    plan = []
    for c, call in enumerate(calls):
        plan.append(list(slots))
        h = slots[:3]
        new = c if call["push"] else (h[2] if skip_prk else h[0])
        slots = h[1:] + [new] + ([] if skip_prk else [slots[4], c])
    return plan


def _call_rows(calls, plan, sample_coef: np.ndarray, mix_coef: np.ndarray) -> np.ndarray:
    """Each call's x_prev as weights over (sample, slots, model_output), saved samples rebuilt.

    A saved sample is carried symbolically as (coefficient of the current sample, output weights)
    and rewritten through each call's x_{c+1} = p_x x_c + p_m . m (p_x > 0).
    """
    C = len(calls)
    saved: dict[int, tuple[float, np.ndarray]] = {}
    sources = {call["source"] for call in calls}
    rows = np.zeros((C, len(plan[0]) + 2))
    for c, call in enumerate(calls):
        src_x, src_m = (1.0, np.zeros(C)) if call["source"] == "x" else saved[call["source"]]
        p_m = src_m * sample_coef[c]
        for j, w in call["mix"].items():
            p_m[j] += w * mix_coef[c]
        p_x = src_x * sample_coef[c]
        p_m[np.abs(p_m) <= 1e-12 * np.abs(p_m).max()] = 0.0  # rebuilt samples cancel old outputs exactly
        rows[c, 0], rows[c, -1] = p_x, p_m[c]
        for j in np.flatnonzero(p_m[:c]):
            rows[c, 1 + plan[c].index(int(j))] += p_m[j]  # ValueError here = slot plan bug
        saved = {k: (sx / p_x, sm - (sx / p_x) * p_m) for k, (sx, sm) in saved.items()}
        if c in sources:
            saved[c] = (1.0 / p_x, -p_m / p_x)  # this call's input, in terms of the next sample
    return rows


class PNDMScheduler(AlphaScheduler):
    """Pseudo linear multistep sampling with a 4th-order Runge-Kutta warm-up (or skip_prk_steps)."""

    _defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    tables_depend_on_begin_index = True  # diffusers' call counter restarts at the first executed call
    # diffusers accepts "sample" in __init__ but every step then raises
    _choices = {"prediction_type": ("epsilon", "v_prediction")}

    def _check_num_steps(self, n: Any) -> None:
        super()._check_num_steps(n)
        if not self.options["skip_prk_steps"] and n < 4:
            raise ValueError(f"num_inference_steps: the PRK warm-up needs >= 4 steps (or skip_prk_steps=True), got {n}")

    def _timesteps(self, n: int) -> tuple[np.ndarray, int]:
        """diffusers' call timesteps (PRK stages then PLMS) and how many of them are PRK."""
        cfg = self.options
        T = cfg["num_train_timesteps"]
        base = np.round(schedule.spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"]))
        base = base.astype(np.int64)[::-1]  # ascending, as diffusers builds it
        if cfg["skip_prk_steps"]:  # the second-to-last grid point is repeated for the Heun-like call
            return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy(), 0
        half = T // n // 2
        stages = np.repeat(base[-4:], 2) + np.tile([0, half], 4)  # t, t + half for the 4 top steps
        prk = np.repeat(stages[:-1], 2)[1:-1][::-1]
        return np.concatenate([prk, base[:-3][::-1]]), prk.size

    def _coefficients(self, t: np.ndarray, t_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x_prev = a x + b output for a step t -> t_prev (PNDM paper, eq. 9); v: eps = sqrt(a_t) v + sqrt(1-a_t) x."""
        cfg = self.options
        T = cfg["num_train_timesteps"]
        if t.max() >= T or t.min() < 0:
            raise ValueError(f"steps_offset: timesteps {t.tolist()} leave [0, num_train_timesteps={T})")
        acp = self.alphas_cumprod
        final = 1.0 if cfg["set_alpha_to_one"] else acp[0]
        a_t = acp[t]
        a_prev = np.where(t_prev >= 0, acp[np.clip(t_prev, 0, T - 1)], final)
        sample_coef = np.sqrt(a_prev / a_t)
        eps_coef = -(a_prev - a_t) / (a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev))
        if cfg["prediction_type"] == "v_prediction":
            return sample_coef + eps_coef * np.sqrt(1 - a_t), eps_coef * np.sqrt(a_t)
        return sample_coef, eps_coef

    def _host_tables(self, n: int, begin_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Call timesteps and weight rows (with the push weights) for n steps; config-only, so cached.

        A run starting at call ``begin_index`` replays diffusers' counter from 0 over ``timesteps[begin_index:]``
        (diffusers' PNDM has no set_begin_index: img2img loops over the slice). For begin_index >= 2 that
        slice lacks the repeated timestep the counter-1 correction relies on, so, as in diffusers,
        the PLMS steps after it treat the sample as one grid step lower than it is.
        """
        cache = self.__dict__.setdefault("_tables_by_steps", {})
        if (n, begin_index) not in cache:
            ts, n_prk = self._timesteps(n)
            if begin_index and n_prk:
                raise ValueError(
                    "begin_index: PNDMScheduler with skip_prk_steps=False cannot start mid-schedule (diffusers' "
                    "Runge-Kutta stages follow its own call counter, not the timesteps); use skip_prk_steps=True"
                )
            check_begin_index(begin_index, ts.shape[0])
            rows = self._call_table(ts[begin_index:], n_prk, n)
            if begin_index:
                rows = np.concatenate([self._host_tables(n)[1][:begin_index], rows])
            cache[n, begin_index] = ts, rows
        return cache[n, begin_index]

    def _call_table(self, ts: np.ndarray, n_prk: int, n: int) -> np.ndarray:
        """Weight rows (with the push weights) of a run over the call timesteps ``ts`` from a fresh counter."""
        calls = _diffusers_calls(ts, n_prk, self.options["num_train_timesteps"], n)
        sample_coef, mix_coef = self._coefficients(
            np.array([c["t"] for c in calls]), np.array([c["t_prev"] for c in calls])
        )
        rows = _call_rows(calls, _slot_plan(calls, bool(self.options["skip_prk_steps"])), sample_coef, mix_coef)
        push = np.array([c["push"] for c in calls], dtype=np.float64)
        return np.column_stack([rows, push, 1.0 - push])

    def _make_state(self, n, like, *, timesteps=None, sigmas=None, begin_index: int = 0) -> PNDMState:
        ts, coefs = self._host_tables(n, begin_index)
        zero = arrays.zeros_like_shape(like)  # never written to, so every empty slot can share it
        return PNDMState(
            timesteps=arrays.host_to_like(ts, like, integer=True),
            coefs=arrays.host_to_like(coefs, like),
            slots=(zero,) * (coefs.shape[1] - 4),
            step_index=arrays.counter_like(like),
            init_noise_sigma=arrays.host_to_like(1.0, like),
        )

    def step(self, state: PNDMState, model_output, sample, noise=None):
        """x_prev = c0 x + sum_k c_k slot_k + c_out model_output: an RK4 stage or a PLMS step (eq. 9-13)."""
        i = state.step_index
        row = state.coefs[i]
        slots = state.slots
        h1, h2, h3 = slots[:3]
        # the pushed slot: the output or, where diffusers keeps its list, h1 (PRK: rotate) or h3
        # (skip_prk_steps: repeat). 0/1 weights give the same bits as xp.where (finite values) at
        # about half its cost on torch.
        new = row[-2] * model_output
        new += row[-1] * (h3 if len(slots) == 3 else h1)
        # accumulate in place into the fresh product (never an input): one allocation per term less
        prev_sample = row[0] * sample
        prev_sample += row[-3] * model_output
        for k, slot in enumerate(slots):
            prev_sample += row[k + 1] * slot
        if len(slots) == 3:
            return prev_sample, state._replace(slots=(h2, h3, new), step_index=i + 1)
        return prev_sample, state._replace(slots=(h2, h3, new, slots[4], model_output), step_index=i + 1)
