"""Core training math against diffusers' training utilities, and the reproducible data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as RefDDPM
from diffusers.training_utils import EMAModel, compute_snr

from diffusion_core import training
from diffusion_core.training.schedules import learning_rate
from tests.training import tiny


@pytest.mark.parametrize(
    "cfg",
    [
        training.EMAConfig(),
        training.EMAConfig(use_ema_warmup=False, max_decay=0.99, update_after_step=3),
        training.EMAConfig(inv_gamma=2.0, power=0.75, min_decay=0.5),
    ],
)
def test_ema_decay_matches_diffusers(cfg):
    ref = EMAModel(
        [torch.nn.Parameter(torch.zeros(1))],
        decay=cfg.max_decay,
        min_decay=cfg.min_decay,
        update_after_step=cfg.update_after_step,
        use_ema_warmup=cfg.use_ema_warmup,
        inv_gamma=cfg.inv_gamma,
        power=cfg.power,
    )
    for step in (1, 2, 3, 5, 10, 100, 10_000, 10**6):
        assert training.ema_decay(step, cfg) == pytest.approx(ref.get_decay(step), rel=1e-12, abs=0)


def test_snr_and_min_snr_weights_match_diffusers_scripts():
    ref = RefDDPM(num_train_timesteps=100)
    sched = tiny.scheduler()
    t = np.array([0, 5, 50, 99])
    ref_snr = compute_snr(ref, torch.from_numpy(t)).numpy()
    ours = training.snr(sched, t, np.zeros(4, np.float32))
    np.testing.assert_allclose(ours, ref_snr, rtol=1e-5)
    clipped = np.minimum(ref_snr, 5.0)
    np.testing.assert_allclose(training.min_snr_weights(ours, 5.0, "epsilon"), clipped / ref_snr, rtol=1e-5)
    np.testing.assert_allclose(training.min_snr_weights(ours, 5.0, "v_prediction"), clipped / (ref_snr + 1), rtol=1e-5)


def test_targets():
    sched = tiny.scheduler()
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 1, 4, 4)).astype(np.float32), rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    t = np.array([3, 70])
    ref = RefDDPM(num_train_timesteps=100)
    v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(training.training_target(sched, x0, eps, t, "v_prediction"), v_ref, rtol=1e-5, atol=1e-6)
    assert training.training_target(sched, x0, eps, t, "epsilon") is eps
    assert training.training_target(sched, x0, eps, t, "sample") is x0
    np.testing.assert_array_equal(training.training_target(sched, x0, eps, t, "flow"), eps - x0)
    with pytest.raises(ValueError, match="prediction_type"):
        training.training_target(sched, x0, eps, t, "x0")


def test_learning_rate_schedules():
    assert learning_rate(0, 1.0, "constant", 4, 10) == 0.25
    assert learning_rate(3, 1.0, "linear", 4, 10) == 1.0
    assert learning_rate(10, 1.0, "linear", 4, 10) == 0.0
    assert learning_rate(7, 1.0, "cosine", 4, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(0, 1.0, "step", 0, 10)


def test_batch_order_is_a_permutation_per_epoch_and_reproducible():
    ds = tiny.dataset(24)
    seen = np.concatenate([training.data.batch_indices(s, 8, 24, 7) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(24))
    a = training.step_batch(ds, 5, 8, 7, 100)
    b = training.step_batch(ds, 5, 8, 7, 100)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 6, "gradient_accumulation_steps": 4}, "multiple"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.TrainConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = training.TrainConfig(snr_gamma=5.0, ema=training.EMAConfig(power=0.75))
    assert training.TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_class_dropout_draws_the_no_class_label_reproducibly_and_leaves_other_draws_alone():
    ds = training.ImageDataset(np.zeros((50, 1, 4, 4), np.float32), np.arange(50) % 5, tuple("abcde"))
    plain = training.step_batch(ds, 3, 400, 1, 100)
    dropped = training.step_batch(ds, 3, 400, 1, 100, class_dropout=0.25)
    again = training.step_batch(ds, 3, 400, 1, 100, class_dropout=0.25)
    np.testing.assert_array_equal(dropped.labels, again.labels)
    np.testing.assert_array_equal(dropped.noise, plain.noise)
    np.testing.assert_array_equal(dropped.timesteps, plain.timesteps)
    null = dropped.labels == 5
    assert 0.15 < null.mean() < 0.35
    np.testing.assert_array_equal(dropped.labels[~null], plain.labels[~null])
