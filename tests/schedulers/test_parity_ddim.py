"""DDIM parity against diffusers 0.42 over its option matrix."""

from tests.schedulers import parity

NAME = "DDIMScheduler"

CASES = parity.grid(
    {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction", "sample"],
        "timestep_spacing": ["leading", "linspace", "trailing"],
    },
    extras=[
        {"clip_sample": False},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"set_alpha_to_one": False},
        {"steps_offset": 1},
        {"thresholding": True, "clip_sample": False},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100},
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
    ],
)

STOCHASTIC = [
    ({"eta": 0.5}, {}),
    ({"eta": 1.0, "use_clipped_model_output": True}, {"clip_sample": True}),
]


@parity.parametrize_cases(CASES)
def test_ddim_parity(config, num_steps, backend):
    parity.check_parity(NAME, config, num_steps, backend)


@parity.parametrize_cases([c for _, c in STOCHASTIC], steps=(2, 10))
def test_ddim_eta_parity(config, num_steps, backend):
    kwargs = next(k for k, c in STOCHASTIC if c == config)
    parity.check_parity(NAME, config, num_steps, backend, step_kwargs=kwargs)
