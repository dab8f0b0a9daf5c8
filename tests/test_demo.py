"""End to end: every VP scheduler samples a known 2-D Gaussian mixture with its exact eps model."""

import pytest

from diffusion_core import demo


@pytest.mark.parametrize("name", demo.VP_SCHEDULERS)
def test_scheduler_recovers_the_mixture(name):
    x, _ = demo.sample(name, steps=25, backend="numpy", n=4096)
    share, mean_abs, std = demo.summary(x)
    assert abs(share - 0.5) < 0.03  # both modes, equally weighted
    assert abs(mean_abs - demo.MODE) < 0.1  # modes in the right place
    assert 0.2 < std < 0.4  # spread near the target 0.3, not collapsed, not noisy


def test_demo_cli_runs_and_prints_every_scheduler(capsys):
    demo.main(["--steps", "4", "--n", "64", "--backends", "numpy"])
    out = capsys.readouterr().out
    for name in demo.VP_SCHEDULERS:
        assert name in out
