"""``transpose_copy`` equals ``np.transpose``; Flax loading adopts only its copies; reads into one reused buffer."""

from __future__ import annotations

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from diffusion_core.weights.transpose import ALIGNMENT, MAPPED_BYTES, aligned_empty, transpose_copy

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_equals_numpy_transpose_for_every_permutation(ndim: int) -> None:
    for axes in itertools.permutations(range(ndim)):
        for shape in [tuple(RNG.integers(1, 7, ndim)), (300, 5, 1, 2)[:ndim], (1, 0, 3, 2)[:ndim]]:
            array = RNG.standard_normal(shape).astype(np.float32)
            got = transpose_copy(array, axes)
            np.testing.assert_array_equal(got, np.transpose(array, axes))
            assert got.flags.c_contiguous and got.dtype == np.float32
            assert got.size == 0 or got.ctypes.data % ALIGNMENT == 0
            assert not np.may_share_memory(got, array)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [((700, 300), (1, 0)), ((520, 40, 3, 3), (2, 3, 1, 0)), ((3, 3, 40, 520), (3, 2, 0, 1)), ((2, 600, 9), (2, 1, 0))],
)
def test_tiled_path_on_layouts_larger_than_one_tile(shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    array = RNG.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(transpose_copy(array, axes), np.transpose(array, axes))
    big = np.concatenate([array] * -(-MAPPED_BYTES // array.nbytes))  # its own memory map
    got = transpose_copy(big, axes)
    assert big.nbytes >= MAPPED_BYTES and got.ctypes.data % ALIGNMENT == 0 and got.flags.writeable
    np.testing.assert_array_equal(got, np.transpose(big, axes))
    strided = np.asarray(array)[::-1]  # not contiguous: read through a copy, same result
    np.testing.assert_array_equal(transpose_copy(strided, axes), np.transpose(strided, axes))


def test_casts_while_copying() -> None:
    array = RNG.standard_normal((300, 20, 3, 3)).astype(np.float32)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        got = transpose_copy(array, (2, 3, 1, 0), dtype)
        np.testing.assert_array_equal(got, np.transpose(array, (2, 3, 1, 0)).astype(dtype))


def test_rejects_axes_that_are_not_a_permutation() -> None:
    with pytest.raises(ValueError, match=r"axes must be a permutation of range\(2\)"):
        transpose_copy(np.zeros((2, 3)), (0, 0))


def test_loader_adopts_its_own_copies_and_copies_the_callers_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusion_core.weights.convert as convert
    from diffusion_core.flax.models.loading import load_torch_state_dict

    copies = []
    monkeypatch.setattr(convert, "transpose_copy", lambda *a: copies.append(transpose_copy(*a)) or copies[-1])

    class Tiny(nnx.Module):
        def __init__(self) -> None:
            self.proj = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    model = Tiny()
    weight = RNG.standard_normal((4, 3)).astype(np.float32)  # torch layout (out, in): transposed on load
    bias = aligned_empty((4,), np.float32)  # same layout, aligned (adoptable): must be copied, it is the caller's
    bias[:] = RNG.standard_normal(4)
    load_torch_state_dict(model, {"proj.weight": weight, "proj.bias": bias})
    expected_bias = bias.copy()
    bias[:] = 0.0
    weight[:] = 0.0
    np.testing.assert_array_equal(np.asarray(model.proj.bias.get_value()), expected_bias)
    assert np.asarray(model.proj.kernel.get_value()).any()
    assert len(copies) == 1
    if jax.default_backend() == "cpu":  # the converter's transposed copy is adopted by XLA:CPU, not copied again
        assert model.proj.kernel.get_value().unsafe_buffer_pointer() == copies[0].ctypes.data


def test_converted_tensors_view_the_file_map_only_while_kept(tmp_path) -> None:
    from safetensors.numpy import save_file

    from diffusion_core.weights import iter_tensors

    tensors = {f"t{i}": RNG.standard_normal(shape).astype(np.float32) for i, shape in enumerate([(50,), (3, 4), (2,)])}
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    kept = dict(iter_tensors(tmp_path, convert=lambda k, a: a))  # views kept: their maps stay open, data valid
    copied = dict(iter_tensors(tmp_path, convert=lambda k, a: a.copy()))
    for key, want in tensors.items():
        assert not kept[key].flags.owndata and copied[key].flags.owndata
        np.testing.assert_array_equal(kept[key], want)
        np.testing.assert_array_equal(copied[key], want)
