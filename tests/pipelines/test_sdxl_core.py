"""The framework-neutral SDXL pieces: schedule cuts, conditioning ids and their checks (diffusers' rules)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_core.pipelines import sdxl

TIMESTEPS = np.array([999, 899, 799, 699, 599, 499, 399, 299, 199, 99])  # 10 steps


def test_denoising_end_and_start_split_the_schedule_at_the_same_timestep():
    end = sdxl.end_call(TIMESTEPS, 0, 1000, 0.8)  # cutoff 200: calls at t >= 200 run in the base
    start = sdxl.start_call(TIMESTEPS, 1000, 0.8, order=1)  # the refiner runs t < 200
    assert (end, start) == (8, 8)
    assert sdxl.end_call(TIMESTEPS, 3, 1000, 0.5) == 5  # from a later first call: the cut is absolute


def test_second_order_start_keeps_an_odd_number_of_calls():
    heun = np.array([999, 799, 799, 599, 599, 399, 399, 199, 199])
    assert sdxl.start_call(heun, 1000, 0.5, order=2) == len(heun) - 5  # 4 calls below 500 -> 5
    with pytest.raises(ValueError, match="denoising_start"):
        sdxl.start_call(TIMESTEPS, 1000, 0.95, order=1)  # cutoff 50: no timestep below it


def test_check_stop():
    assert sdxl.check_stop(None, 0, 10) == 10
    assert sdxl.check_stop(4, 2, 10) == 4
    for bad in (2, 11, True, 3.0):
        with pytest.raises(ValueError, match="stop"):
            sdxl.check_stop(bad, 2, 10)


def test_time_ids():
    base = sdxl.base_time_ids({"crops_coords_top_left": (1, 2)}, (64, 32))
    assert base == ((64, 32, 1, 2, 64, 32),) * 2
    only_one = sdxl.base_time_ids({"negative_original_size": (8, 8)}, (64, 32))
    assert only_one[1] == only_one[0]  # diffusers uses the negative sizes only when both are given
    refiner = sdxl.refiner_time_ids({"aesthetic_score": 7.0, "negative_crops_coords_top_left": (5, 5)}, (16, 16), True)
    assert refiner == ((16, 16, 0, 0, 7.0), (16, 16, 5, 5, 2.5))
    plain = sdxl.refiner_time_ids({"negative_crops_coords_top_left": (5, 5), "target_size": (8, 8)}, (16, 16), False)
    assert plain[1] == (16, 16, 0, 0, 8, 8)  # diffusers: the positive crops in the negative ids
    batch = sdxl.time_id_batch((1, 1), (0, 0), 2, 2, None)
    np.testing.assert_array_equal(batch, [[0, 0], [1, 1], [0, 0], [1, 1]])  # cat([neg, pos]).repeat(2, 1)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"original_size": (1, 2, 3)}, "original_size"),
        ({"target_size": (1.5, 2)}, "target_size"),
        ({"crops_coords_top_left": "00"}, "crops_coords_top_left"),
    ],
)
def test_bad_sizes_raise(given, named):
    with pytest.raises(ValueError, match=named):
        sdxl.base_time_ids(given, (8, 8))


def test_bad_scores_and_fractions_raise():
    with pytest.raises(ValueError, match="aesthetic_score"):
        sdxl.refiner_time_ids({"aesthetic_score": float("nan")}, (8, 8), True)
    for bad in (0.0, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="denoising_end"):
            sdxl.fraction("denoising_end", bad)


def test_time_id_width_is_checked():
    unet = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,
    }
    sdxl.check_time_id_width(unet, 6, 32)
    with pytest.raises(ValueError, match="requires_aesthetics_score"):
        sdxl.check_time_id_width(unet, 5, 32)
