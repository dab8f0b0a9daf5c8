"""scheduler_config.json compatibility with diffusers 0.42, swaps, and config errors."""

import json
import logging

import diffusers
import numpy as np
import pytest

from diffusion_core import schedulers
from diffusion_core.schedulers import base
from tests.config_files import assert_same_config_file

NAMES = [cls.__name__ for cls in schedulers.all_scheduler_classes()]
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _ours_config_from_diffusers(name, tmp_path, **kwargs):
    ref = getattr(diffusers, name)(**kwargs)
    ref.save_config(tmp_path)
    return ref, schedulers.from_config(tmp_path)


# Integer timesteps agree exactly; fractional ones (KDPM2 midpoints, sigma_to_t) to float32 rounding,
# since diffusers computes them with float32 log/exp.
def assert_same_timesteps(ours, ref):
    np.testing.assert_allclose(ours, np.asarray(ref, np.float64), rtol=1e-6, atol=1e-5)


def _timesteps(sched, n=10):
    return np.asarray(sched.set_timesteps(n, like=np.zeros((1, 4, 2, 2), np.float32)).timesteps, np.float64)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_config_loads_with_same_options_and_timesteps(name, tmp_path):
    ref, ours = _ours_config_from_diffusers(name, tmp_path)
    ref_cfg = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert set(ours.config) == set(ref_cfg), "option set differs from diffusers'"
    for k, v in ref_cfg.items():
        assert json.loads(json.dumps(ours.config[k])) == json.loads(json.dumps(v, default=list)), k
    ref.set_timesteps(10)
    assert_same_timesteps(_timesteps(ours), ref.timesteps.numpy())


@pytest.mark.parametrize("name", NAMES)
def test_saved_config_is_byte_identical_to_diffusers_and_loads_there(name, tmp_path):
    ref = getattr(diffusers, name)()
    ref.save_config(tmp_path / "ref")
    ours = schedulers.get_scheduler_class(name)()
    ours.save_config(tmp_path / "ours")
    assert_same_config_file(
        tmp_path / "ours" / base.SCHEDULER_CONFIG_NAME, tmp_path / "ref" / base.SCHEDULER_CONFIG_NAME
    )
    back = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    back.set_timesteps(7)
    assert_same_timesteps(_timesteps(ours, 7), back.timesteps.numpy())


def test_non_default_config_round_trips_both_ways(tmp_path):
    ours = schedulers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    ours.save_config(tmp_path)
    ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    options = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    assert {k: ref.config[k] for k in options} == options
    again = schedulers.from_config(tmp_path)
    assert again.to_dict() == ours.to_dict()
    ref.set_timesteps(5)
    assert_same_timesteps(_timesteps(again, 5), ref.timesteps.numpy())


def test_trained_betas_round_trip(tmp_path):
    betas = np.linspace(1e-4, 2e-2, 50)
    ours = schedulers.DDIMScheduler(trained_betas=betas, num_train_timesteps=50)
    assert ours.config["trained_betas"] == betas.tolist()
    ours.save_config(tmp_path)
    ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(ref.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(schedulers.from_config(tmp_path).betas, betas)


def test_swap_to_unclip_from_a_non_cosine_schedule_raises_like_diffusers():
    src = diffusers.DDIMScheduler(**SD)
    with pytest.raises(ValueError):
        diffusers.UnCLIPScheduler.from_config(src.config)
    with pytest.raises(ValueError, match="beta_schedule"):
        schedulers.from_config({**schedulers.DDIMScheduler(**SD).config, "_class_name": "UnCLIPScheduler"})


# UnCLIPScheduler takes the cosine schedule only: its swap is the test above
@pytest.mark.parametrize("target", [n for n in NAMES if n not in ("DDIMScheduler", "UnCLIPScheduler")])
def test_swap_from_another_class_uses_the_same_options_as_diffusers(target):
    src = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
    ref = getattr(diffusers, target).from_config(src.config)
    ours = schedulers.from_config({**src.config, "_class_name": target})
    # and the DESIGN.md idiom on our own config: options left at DDIM's defaults take the target's
    ours_src = schedulers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
    ours_swapped = schedulers.from_config({**ours_src.config, "_class_name": target})
    assert type(ours).__name__ == target
    for key in type(ours)._defaults:
        assert json.dumps(ours.config[key]) == json.dumps(ref.config[key], default=list), key
        assert json.dumps(ours_swapped.config[key]) == json.dumps(ref.config[key], default=list), key
    # keys only DDIM uses are kept, so swapping back restores the original scheduler
    back = schedulers.from_config({**ours.config, "_class_name": "DDIMScheduler"})
    assert back.config["set_alpha_to_one"] is False


def test_class_from_config_ignores_the_source_class_name():
    cfg = {**schedulers.DDIMScheduler(**SD).to_dict()}
    euler = schedulers.EulerDiscreteScheduler.from_config(cfg)
    assert type(euler).__name__ == "EulerDiscreteScheduler"
    assert euler.config["beta_schedule"] == "scaled_linear"


def test_unknown_key_is_kept_and_warned_once(caplog):
    base._WARNED_KEYS.clear()
    cfg = {"_class_name": "DDIMScheduler", "not_an_option_xyz": 3}
    with caplog.at_level(logging.WARNING, logger="diffusion_core.schedulers.base"):
        s1 = schedulers.from_config(cfg)
        s2 = schedulers.from_config(cfg)
    assert s1.config["not_an_option_xyz"] == 3 and s2.config["not_an_option_xyz"] == 3
    assert sum("not_an_option_xyz" in r.getMessage() for r in caplog.records) == 1


def test_from_config_accepts_file_folder_and_subfolder(tmp_path):
    ours = schedulers.DDIMScheduler(**SD)
    ours.save_config(tmp_path / "scheduler")
    for src, kw in [
        (tmp_path / "scheduler", {}),
        (tmp_path / "scheduler" / "scheduler_config.json", {}),
        (str(tmp_path), {"subfolder": "scheduler"}),
    ]:
        assert schedulers.from_config(src, **kw).to_dict() == ours.to_dict()


@pytest.mark.parametrize(
    "config,match",
    [
        ({"_class_name": "DDIMScheduler", "beta_schedule": "cosine"}, "beta_schedule"),
        ({"_class_name": "DDIMScheduler", "prediction_type": "noise"}, "prediction_type"),
        ({"_class_name": "DDIMScheduler", "timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"_class_name": "DDIMScheduler", "num_train_timesteps": 0}, "num_train_timesteps"),
        (
            {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_exponential_sigmas": True},
            "mutually exclusive",
        ),
        ({"_class_name": "NoSuchScheduler"}, "_class_name"),
        ({"beta_schedule": "linear"}, "_class_name"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        schedulers.from_config(config)


def test_invalid_sources_and_options_raise():
    with pytest.raises(FileNotFoundError, match="config"):
        schedulers.from_config("/nonexistent/folder")
    with pytest.raises(ValueError, match="config"):
        schedulers.from_config(42)
    with pytest.raises(ValueError, match="beta_shedule"):
        schedulers.DDIMScheduler(beta_shedule="linear")


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, None, True])
def test_num_inference_steps_out_of_range_raises(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.DDIMScheduler().set_timesteps(n)


def test_custom_timesteps_rejected_where_unsupported():
    with pytest.raises(ValueError, match="timesteps"):
        schedulers.DDIMScheduler().set_timesteps(timesteps=[900, 500, 100])


def test_importing_core_pulls_in_no_framework():
    import subprocess
    import sys

    code = "import sys, diffusion_core; print(','.join(m for m in ('torch','jax','flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize(
    "target",
    ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler"],
)
def test_foreign_options_from_a_swap_are_kept_but_not_acted_on(target):
    """DDPM's clip_sample=True / variance_type carried into another class's config change nothing, as in diffusers."""
    import torch

    ddpm = {"_class_name": "DDPMScheduler", "clip_sample": True, "variance_type": "fixed_small"}
    ours = schedulers.from_config({**schedulers.from_config(ddpm).config, "_class_name": target})
    assert ours.config["clip_sample"] is True and "clip_sample" not in ours.options
    ref = getattr(diffusers, target).from_config(diffusers.DDPMScheduler.from_config(ddpm).config)
    clean = schedulers.from_config({"_class_name": target})
    x = np.linspace(-40.0, 40.0, 2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)  # large: clipping would show
    out = (0.5 * x[::-1]).copy()
    results = []
    for sched in (ours, clean):
        state = sched.set_timesteps(4, like=x)
        y = x * float(state.init_noise_sigma)
        y, state = sched.step(state, out, y)
        results.append(y)
    ref.set_timesteps(4)
    t = ref.timesteps[0]
    expect = ref.step(torch.from_numpy(out), t, torch.from_numpy(x) * ref.init_noise_sigma).prev_sample.numpy()
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=0)
    np.testing.assert_allclose(results[0], expect, rtol=1e-5, atol=1e-4)
