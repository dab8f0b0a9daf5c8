"""The Flax loader's opt-in cache of converted weights.

A second load maps the converted copy without reading the checkpoint, gives the streaming loader's parameters
bit for bit (an embedding table and T5's float32 ``wo`` in a float16 model included) and, on the CPU, uses the
entry's pages without a copy; an entry is per (checkpoint, class, dtype), is rewritten when the checkpoint changes
or the entry is damaged, is never written through by a program that donates its weights, and a cache that cannot
be written only costs a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import diffusion_core.weights.pretrained as pretrained
from diffusion_core.flax import enable_weight_cache, weight_cache_dir
from diffusion_core.flax.models import T5EncoderModel, weight_cache
from diffusion_core.flax.models import UNet2DModel as FlaxUNet
from diffusion_core.flax.models.loading import WEIGHTS, load_torch_state_dict
from diffusion_core.flax.models.modeling import _abstract_model
from tests.pipelines.tiny import DDPM_TEST_UNET
from tests.torch_models.test_t5 import build_reference


@pytest.fixture
def unet_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    diffusers.UNet2DModel(**DDPM_TEST_UNET).save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The weight cache on, in a fresh folder, for this test only."""
    monkeypatch.setattr(weight_cache, "_cache_dir", weight_cache._cache_dir)  # restored afterwards
    enable_weight_cache(tmp_path / "cache")
    return tmp_path / "cache"


def _params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def _streamed(cls: type, folder: Path, dtype: Any = jnp.float32) -> dict[tuple, np.ndarray]:
    """The parameters the one-tensor-at-a-time converter gives (no read-ahead, no cache)."""
    source = cls.pretrained_source(folder)
    model = _abstract_model(cls, source.config, dtype)
    load_torch_state_dict(model, source.tensors("numpy", None))
    return _params(model)


def _assert_same(got: dict[tuple, np.ndarray], want: dict[tuple, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_array_equal(got[path].view(np.uint8), want[path].view(np.uint8), err_msg=str(path))


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the checkpoint's tensors were read")

    monkeypatch.setattr(pretrained, "iter_tensors", refuse)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_cached_t5_equals_the_streamed_one(tmp_path: Path, cache: Path, dtype: Any) -> None:
    """Embedding tables keep their layout; ``wo`` stays float32 in a float16 model (its own dtype in the entry)."""
    build_reference("gated_gelu").save_pretrained(tmp_path / "t5")
    want = _streamed(T5EncoderModel, tmp_path / "t5", dtype)
    for _ in range(2):  # written, then read
        got = _params(T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=dtype))
        assert got[("encoder", "block", 0, "layer", 1, "DenseReluDense", "wo", "kernel")].dtype == np.float32
        _assert_same(got, want)
    assert len(list(cache.iterdir())) == 1


def test_cache_is_off_unless_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weight_cache, "_cache_dir", weight_cache._UNSET)
    monkeypatch.delenv(weight_cache.ENV_VAR, raising=False)
    assert weight_cache_dir() is None
    monkeypatch.setenv(weight_cache.ENV_VAR, str(tmp_path / "env"))
    assert weight_cache_dir() == tmp_path / "env"
    enable_weight_cache(None)  # the call wins over the environment
    assert weight_cache_dir() is None
    for bad in (3, "", b"/tmp"):
        with pytest.raises(ValueError, match="cache_dir must be a folder path or None"):
            enable_weight_cache(bad)


def test_second_load_maps_the_cached_copy(unet_folder: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = _streamed(FlaxUNet, unet_folder)
    first = FlaxUNet.from_pretrained(unet_folder)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == weight_cache.SUFFIX  # no temporary file left beside it
    _assert_same(_params(first), want)
    with monkeypatch.context() as m:
        _no_reads(m)
        second = FlaxUNet.from_pretrained(unet_folder)
    _assert_same(_params(second), want)
    if Path("/proc/self/maps").is_file():  # on the CPU the parameters are the entry's mapped pages, not a copy
        pointer = second.conv_in.kernel.get_value().unsafe_buffer_pointer()
        ranges = [
            [int(a, 16) for a in line.split()[0].split("-")]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(entries[0]))
        ]
        assert any(lo <= pointer < hi for lo, hi in ranges)
    x = jnp.ones((1, 3, 32, 32))
    np.testing.assert_array_equal(np.asarray(second(x, 10)), np.asarray(first(x, 10)))


def test_entries_are_per_dtype_and_follow_the_checkpoint(unet_folder: Path, cache: Path) -> None:
    FlaxUNet.from_pretrained(unet_folder)
    bf16 = FlaxUNet.from_pretrained(unet_folder, dtype=jnp.bfloat16)
    assert len(list(cache.iterdir())) == 2
    _assert_same(_params(bf16), _streamed(FlaxUNet, unet_folder, jnp.bfloat16))
    torch.manual_seed(1)  # new weights in the same folder: the old entry must not be served
    diffusers.UNet2DModel(**DDPM_TEST_UNET).save_pretrained(unet_folder)
    _assert_same(_params(FlaxUNet.from_pretrained(unet_folder)), _streamed(FlaxUNet, unet_folder))
    assert len(list(cache.iterdir())) == 3


def test_a_damaged_entry_is_rewritten(unet_folder: Path, cache: Path) -> None:
    want = _streamed(FlaxUNet, unet_folder)
    FlaxUNet.from_pretrained(unet_folder)
    (entry,) = cache.iterdir()
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])  # cut short
    _assert_same(_params(FlaxUNet.from_pretrained(unet_folder)), want)
    assert entry.stat().st_size == len(data)
    entry.write_bytes(weight_cache.MAGIC + b"\x05\x00\x00\x00\x00\x00\x00\x00{nope" + data[30:])  # a bad header
    with pytest.warns(UserWarning, match="weight cache: ignoring"):
        _assert_same(_params(FlaxUNet.from_pretrained(unet_folder)), want)
    assert entry.read_bytes() == data


def test_donated_weights_never_reach_the_entry(unet_folder: Path, cache: Path) -> None:
    FlaxUNet.from_pretrained(unet_folder)
    (entry,) = cache.iterdir()
    before = entry.read_bytes()
    model = FlaxUNet.from_pretrained(unet_folder)
    kernel = model.conv_in.kernel.get_value()
    original = np.array(kernel)  # a copy
    want = original + 1
    bumped = jax.jit(lambda k: k + 1, donate_argnums=0)(kernel)  # may write in place into the mapped buffer
    np.testing.assert_array_equal(np.asarray(bumped), want)
    assert entry.read_bytes() == before
    again = FlaxUNet.from_pretrained(unet_folder)
    np.testing.assert_array_equal(np.asarray(again.conv_in.kernel.get_value()), original)


def test_a_cache_that_cannot_be_written_only_warns(unet_folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    previous = weight_cache._cache_dir
    enable_weight_cache(blocker)
    try:
        with pytest.warns(UserWarning, match="weight cache: could not write"):
            model = FlaxUNet.from_pretrained(unet_folder)
    finally:
        weight_cache._cache_dir = previous
    _assert_same(_params(model), _streamed(FlaxUNet, unet_folder))


def test_check_finite_reads_the_checkpoint_itself(unet_folder: Path, cache: Path) -> None:
    FlaxUNet.from_pretrained(unet_folder, check_finite=True)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_pipeline_caches_every_model_and_makes_the_same_image(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusion_core.flax import DiffusionPipeline
    from tests.pipelines import sd_tiny

    folder = sd_tiny.save_sd_pipeline(tmp_path / "sd")

    def image(pipe: Any) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red cube", num_inference_steps=2, key=jax.random.key(0), height=32, width=32, output_type="np")
        return np.asarray(out.images)

    want = image(DiffusionPipeline.from_pretrained(folder))
    assert len(list(cache.iterdir())) == 3  # unet, vae, text_encoder
    with monkeypatch.context() as m:
        _no_reads(m)
        np.testing.assert_array_equal(image(DiffusionPipeline.from_pretrained(folder)), want)
