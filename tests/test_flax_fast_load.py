"""Flax ``from_pretrained``'s fast path: the abstract-model cache, threaded read-and-convert, and their safety.

Two models loaded from one cached abstract graph share no mutable state; reading on several threads gives the
same parameters as one thread and as the streaming loader; the plan from the header raises the streaming
converter's errors before any tensor is read; a stream that disagrees with its header is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from diffusion_core.flax.models import UNet2DModel as FlaxUNet
from diffusion_core.flax.models.loading import WEIGHTS, load_checkpoint, load_torch_state_dict
from diffusion_core.flax.models.modeling import _abstract_model, _abstract_parts
from diffusion_core.weights import iter_tensors
from diffusion_core.weights.convert import torch_to_flax, torch_to_flax_plan
from diffusion_core.weights.io import read_safetensors_plain
from tests.pipelines.tiny import DDPM_TEST_UNET

UNET: dict[str, Any] = dict(DDPM_TEST_UNET)  # diffusers' DDPM fast-test UNet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    diffusers.UNet2DModel(**UNET).save_pretrained(folder, safe_serialization=True)
    return folder


def _params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def test_two_loads_share_no_state_and_the_second_uses_the_cache(checkpoint: Path) -> None:
    first = FlaxUNet.from_pretrained(checkpoint)
    hits = _abstract_parts.cache_info().hits
    second = FlaxUNet.from_pretrained(checkpoint)
    assert _abstract_parts.cache_info().hits == hits + 1
    before = _params(second)
    kernel = first.conv_in.kernel
    assert kernel is not second.conv_in.kernel
    kernel.set_value(kernel.get_value() + 1.0)  # mutate the first model only
    for path, value in _params(second).items():
        np.testing.assert_array_equal(value, before[path], err_msg=str(path))
    assert not np.array_equal(np.asarray(first.conv_in.kernel.get_value()), before[("conv_in", "kernel")])
    third = FlaxUNet.from_pretrained(checkpoint)  # the cache holds shapes only, never a loaded model's weights
    for path, value in _params(third).items():
        np.testing.assert_array_equal(value, before[path], err_msg=str(path))


def test_cached_abstract_model_is_fresh_per_config_and_dtype() -> None:
    a = _abstract_model(FlaxUNet, dict(UNET), jnp.float32)
    b = _abstract_model(FlaxUNet, {**UNET, "block_out_channels": (8, 8)}, jnp.float32)
    c = _abstract_model(FlaxUNet, dict(UNET), jnp.bfloat16)
    assert a.conv_in.kernel.shape[-1] == 4 and b.conv_in.kernel.shape[-1] == 8
    assert a.conv_in.kernel.dtype == jnp.float32 and c.conv_in.kernel.dtype == jnp.bfloat16


@pytest.mark.parametrize("workers", [1, 3])
def test_threaded_load_equals_streaming_load(checkpoint: Path, workers: int) -> None:
    source = FlaxUNet.pretrained_source(checkpoint)
    fast = _abstract_model(FlaxUNet, source.config, jnp.float32)
    load_checkpoint(fast, source, workers)
    slow = _abstract_model(FlaxUNet, source.config, jnp.float32)
    load_torch_state_dict(slow, iter_tensors(checkpoint))
    want = _params(slow)
    got = _params(fast)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_threaded_load_casts_to_the_parameter_dtype(checkpoint: Path) -> None:
    model = FlaxUNet.from_pretrained(checkpoint, dtype=jnp.bfloat16)
    slow = _abstract_model(FlaxUNet, dict(model.config), jnp.bfloat16)
    load_torch_state_dict(slow, iter_tensors(checkpoint))
    want = _params(slow)
    for path, value in _params(model).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value.view(np.uint16), want[path].view(np.uint16), err_msg=str(path))


def test_a_stream_that_disagrees_with_its_header_is_refused(checkpoint: Path) -> None:
    source = FlaxUNet.pretrained_source(checkpoint)
    model = _abstract_model(FlaxUNet, source.config, jnp.float32)
    kernel = model.conv_in.kernel.get_value()

    def short(framework: str, dtype: Any, convert: Any = None, workers: int = 1) -> Any:
        return list(source.tensors(framework, dtype, convert, workers))[1:]  # one tensor never arrives

    def stray(framework: str, dtype: Any, convert: Any = None, workers: int = 1) -> Any:
        yield from source.tensors(framework, dtype, convert, workers)
        yield "stray.weight", convert("stray.weight", np.zeros(3, np.float32))

    with pytest.raises(ValueError, match="were not read"):
        load_checkpoint(model, source._replace(tensors=short))
    with pytest.raises(ValueError, match="'stray.weight' is not among the keys its header lists"):
        load_checkpoint(model, source._replace(tensors=stray))
    assert model.conv_in.kernel.get_value() is kernel  # all or nothing: untouched


def test_plan_raises_what_the_streaming_converter_raises() -> None:
    target = {("a", "kernel"): (3, 2), ("b", "bias"): (4,), ("c", "scale"): (5,)}
    shapes = {"a.weight": (2, 3), "b.bias": (3,), "nope.weight": (1,)}  # c missing, b mis-shaped, nope unmatched
    with pytest.raises(ValueError) as streamed:
        list(torch_to_flax(((k, np.zeros(s, np.float32)) for k, s in shapes.items()), target))
    with pytest.raises(ValueError) as planned:
        torch_to_flax_plan(shapes, target)
    assert str(planned.value) == str(streamed.value)
    plan = torch_to_flax_plan({"a.weight": (2, 3), "b.bias": (4,), "c.weight": (5,)}, target)
    path, rule = plan["a.weight"]
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert path == ("a", "kernel")
    np.testing.assert_array_equal(rule.flax_copy(array), array.T)
    kept = plan["b.bias"][1].flax_copy(np.ones(4, np.float32), np.dtype(np.float16))
    assert kept.dtype == np.float16 and kept.ctypes.data % 64 == 0


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_read_and_convert_on_threads_keeps_key_order_and_values(tmp_path: Path, workers: int) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"t{i:02d}": rng.standard_normal((i % 5 + 1, 7)).astype(np.float32) for i in range(23)}
    tensors["empty"] = np.zeros((0, 3), np.float32)
    save_file(tensors, tmp_path / "w.safetensors")
    got = list(read_safetensors_plain(tmp_path / "w.safetensors", lambda key, a: (key, a.copy()), workers))
    assert [k for k, _ in got] == sorted(tensors)
    for key, (seen_key, array) in got:
        assert seen_key == key
        np.testing.assert_array_equal(array, tensors[key])


def test_workers_and_convert_are_checked(tmp_path: Path) -> None:
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "diffusion_pytorch_model.safetensors")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive int"):
            iter_tensors(tmp_path, convert=lambda k, a: a, workers=bad)
    with pytest.raises(ValueError, match="framework must be 'numpy'"):
        iter_tensors(tmp_path, framework="pt", convert=lambda k, a: a)


def test_weights_land_on_the_callers_default_device(checkpoint: Path) -> None:
    import jax

    device = jax.devices()[-1]
    assert device != jax.devices()[0]  # tests run with 8 forced host devices (conftest)
    with jax.default_device(device):  # a per-thread setting: the loader's threads must not lose it
        model = FlaxUNet.from_pretrained(checkpoint)
    for _, var in nnx.to_flat_state(nnx.state(model, WEIGHTS)):
        assert var.get_value().devices() == {device}


def test_shape_only_init_is_scoped_to_its_context():
    """Abstract builds trace zeros initialisers (cheaper than random draws); models built outside stay random."""
    from diffusion_core.flax.models.layers import shape_only_init

    def kernels(model):
        return [v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[-1] == "kernel"]

    with shape_only_init():
        zeroed = FlaxUNet.from_config(dict(UNET))
    assert all(not np.asarray(k.get_value()).any() for k in kernels(zeroed))
    random = FlaxUNet.from_config(dict(UNET))
    assert all(np.asarray(k.get_value()).std() > 0 for k in kernels(random))
