"""Checkpoint I/O against diffusers 0.42 as the oracle: file names, sharding, variants, errors, atomicity."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from diffusion_core import atomic, weights
from diffusion_core.weights import save as save_module

diffusers = pytest.importorskip("diffusers")

SHARD = "10KB"


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same(actual: dict, expected: dict) -> None:
    assert list(sorted(actual)) == list(sorted(expected))
    for key, value in expected.items():
        got = np.asarray(actual[key])
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CASES = {"single": {}, "sharded": {"max_shard_size": SHARD}, "fp16": {"variant": "fp16"}}
CASES["fp16-sharded"] = {"variant": "fp16", "max_shard_size": SHARD}


@pytest.fixture(scope="module")
def models():
    model = tiny_unet()
    return {"fp32": model, "fp16": copy.deepcopy(model).half()}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """The tiny UNet saved by diffusers in each layout (fp16 variants really hold fp16)."""
    root = tmp_path_factory.mktemp("diffusers_saved")
    out = {}
    for name, kwargs in CASES.items():
        model = models["fp16" if "variant" in kwargs else "fp32"]
        model.save_pretrained(root / name, **kwargs)
        out[name] = (root / name, kwargs.get("variant"), numpy_state(model))
    return out


def test_import_does_not_pull_frameworks():
    code = "import sys, diffusion_core.weights; print([m for m in ('torch', 'jax', 'flax') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_names_match_diffusers(saved):
    names = {k: sorted(os.listdir(v[0])) for k, v in saved.items()}
    assert weights.add_variant(weights.DIFFUSERS_WEIGHTS_NAME, "fp16") in names["fp16"]
    assert weights.index_name(weights.DIFFUSERS_WEIGHTS_NAME, "fp16") in names["fp16-sharded"]
    for case, variant in (("sharded", None), ("fp16-sharded", "fp16")):
        count = len(names[case]) - 2  # config.json and the index
        shards = [weights.shard_name(weights.DIFFUSERS_WEIGHTS_NAME, variant, i, count) for i in range(1, count + 1)]
        assert names[case] == sorted(
            ["config.json", weights.index_name(weights.DIFFUSERS_WEIGHTS_NAME, variant)] + shards
        )


@pytest.mark.parametrize("case", list(CASES))
def test_read_diffusers_checkpoints(saved, case):
    folder, variant, expected = saved[case]
    files = weights.resolve_weight_files(folder, variant=variant)
    assert (files.weight_map is not None) == ("sharded" in case)
    assert_same(weights.load_tensors(folder, variant=variant), expected)
    infos = weights.tensor_infos(folder, variant=variant)
    assert infos == {k: (str(v.dtype), v.shape) for k, v in expected.items()}


def test_read_frameworks_and_cast(saved):
    folder, _, expected = saved["sharded"]
    as_torch = weights.load_tensors(folder, framework="pt", dtype="bfloat16")
    key = "conv_in.weight"
    assert as_torch[key].dtype == torch.bfloat16
    assert torch.equal(as_torch[key], torch.from_numpy(expected[key]).to(torch.bfloat16))
    half = weights.load_tensors(folder, dtype=np.float16)
    assert half[key].tobytes() == expected[key].astype(np.float16).tobytes()
    as_jax = weights.load_tensors(folder, framework="flax")
    assert np.asarray(as_jax[key]).tobytes() == expected[key].tobytes()
    with pytest.raises(ValueError, match="framework"):
        weights.iter_tensors(folder, framework="tf")
    with pytest.raises(ValueError, match="dtype"):
        weights.iter_tensors(folder, dtype="not-a-dtype")


@pytest.mark.parametrize("case", ["single", "fp16-sharded"])
def test_our_save_loads_in_diffusers(saved, models, tmp_path, case):
    ref_folder, variant, expected = saved[case]
    kwargs = CASES[case]
    folder = tmp_path / "unet"
    models["fp32"].save_config(folder)
    state = models["fp16" if variant else "fp32"].state_dict()  # torch tensors, through __array__-like path
    weights.save_state_dict(state, folder, **kwargs)
    assert sorted(os.listdir(folder)) == sorted(os.listdir(ref_folder))
    for name in os.listdir(ref_folder):  # same split, same header, same bytes as diffusers
        if name != "config.json":
            assert (folder / name).read_bytes() == (ref_folder / name).read_bytes(), name
    dtype = torch.float16 if variant else torch.float32
    loaded = diffusers.UNet2DModel.from_pretrained(folder, variant=variant, torch_dtype=dtype)
    assert_same(numpy_state(loaded), expected)
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}


def test_resave_replaces_old_files(tmp_path, models):
    folder = tmp_path / "unet"
    state = numpy_state(models["fp32"])
    weights.save_state_dict(state, folder, max_shard_size=SHARD)
    weights.save_state_dict(state, folder, variant="fp16", max_shard_size=4000)
    (folder / "config.json").write_text("{}")
    weights.save_state_dict(state, folder)
    names = sorted(os.listdir(folder))
    assert "diffusion_pytorch_model.safetensors" in names and "config.json" in names
    assert not any(n.startswith("diffusion_pytorch_model-") or n.endswith("index.json") for n in names)
    assert sum(n.startswith("diffusion_pytorch_model.fp16-") for n in names) > 1  # other variant kept
    assert_same(weights.load_tensors(folder), state)
    assert_same(weights.load_tensors(folder, variant="fp16"), state)
    assert sorted(os.listdir(tmp_path)) == ["unet"]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700


def test_swap_without_renameat2(tmp_path, models, monkeypatch):
    folder = tmp_path / "unet"
    state = numpy_state(models["fp32"])
    weights.save_state_dict(state, folder, max_shard_size=SHARD)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    weights.save_state_dict({k: v + 1 for k, v in state.items()}, folder)
    assert sorted(os.listdir(tmp_path)) == ["unet"]
    assert sorted(os.listdir(folder)) == ["diffusion_pytorch_model.safetensors"]
    assert_same(weights.load_tensors(folder), {k: v + 1 for k, v in state.items()})


def test_failed_save_leaves_folder_untouched(tmp_path, models, monkeypatch):
    folder = tmp_path / "unet"
    state = numpy_state(models["fp32"])
    weights.save_state_dict(state, folder, max_shard_size=SHARD)
    (folder / "config.json").write_text('{"a": 1}')
    before = snapshot(folder)
    calls = []
    real = save_module._write_shard

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(path, tensors, metadata)

    monkeypatch.setattr(save_module, "_write_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        weights.save_state_dict({k: v * 2 for k, v in state.items()}, folder, max_shard_size=20_000)
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["unet"]


def test_bfloat16_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = torch.randn(3, 5, dtype=torch.bfloat16)
    state = {"t": ref, "n": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    weights.save_state_dict(state, tmp_path / "m", weights_name=weights.TRANSFORMERS_WEIGHTS_NAME)
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), ref)
        assert torch.equal(f.get_tensor("n"), torch.arange(4, dtype=torch.bfloat16))
    infos = weights.tensor_infos(tmp_path / "m", weights_name="model.safetensors")
    assert infos == {"t": ("bfloat16", (3, 5)), "n": ("bfloat16", (4,))}
    back = weights.load_tensors(tmp_path / "m", weights_name="model.safetensors")
    assert back["t"].dtype == ml_dtypes.bfloat16 and back["t"].tobytes() == weights.as_numpy(ref).tobytes()


def test_strided_arrays_saved_in_logical_order(tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(2, 3).T
    weights.save_state_dict({"a": array}, tmp_path / "m")
    np.testing.assert_array_equal(weights.load_tensors(tmp_path / "m")["a"], array)


def test_plan_and_sizes():
    assert weights.parse_size("10KB") == 10_000 and weights.parse_size("5GB") == 5 * 10**9
    assert weights.parse_size("1GiB") == 2**30 and weights.parse_size(123) == 123
    for bad in ("10XB", "", -1, 0, 1.5, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            weights.parse_size(bad)
    # as huggingface_hub: an oversized tensor's own shard is emitted at once, before the open one
    assert weights.plan_shards({"a": 4, "b": 4, "c": 20, "d": 3, "e": 5}, 10) == [["c"], ["a", "b"], ["d", "e"]]


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def rewrite_shard(folder: Path, name: str, change) -> None:
    with safe_open(folder / name, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})


def test_index_errors(saved, tmp_path):
    src = saved["sharded"][0]
    index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    key, first = next(iter(index.items()))

    folder = copy_folder(src, tmp_path / "missing_file")
    (folder / first).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing.*{first}.*{key}"):
        weights.tensor_infos(folder)

    folder = copy_folder(src, tmp_path / "missing_key")
    rewrite_shard(folder, first, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"listed but absent 1: \\[{key} "):
        weights.iter_tensors(folder)

    folder = copy_folder(src, tmp_path / "extra_key")
    rewrite_shard(folder, first, lambda t: t.update(stray=np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="not listed there 1: \\[stray "):
        weights.load_tensors(folder)

    folder = copy_folder(src, tmp_path / "escape")
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {key: "../x.safetensors"}}))
    with pytest.raises(ValueError, match="outside its folder"):
        weights.resolve_weight_files(folder)


def test_missing_variant_and_pickle(saved, models, tmp_path):
    folder = saved["single"][0]
    with pytest.raises(FileNotFoundError, match=r"variant='bf16'.*diffusion_pytorch_model\.safetensors'"):
        weights.resolve_weight_files(folder, variant="bf16")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        weights.resolve_weight_files(tmp_path)
    with pytest.raises(ValueError, match="variant"):
        weights.resolve_weight_files(folder, variant="../x")
    models["fp32"].save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
        weights.load_tensors(tmp_path / "bin")
    assert_same(weights.load_tensors(tmp_path / "bin", allow_pickle=True), saved["single"][2])


def test_check_keys(saved):
    infos = weights.tensor_infos(saved["single"][0])
    weights.check_keys(infos, infos)
    expected = {k: v[1] for k, v in infos.items()}
    expected.pop("conv_in.bias")
    expected["extra.weight"] = (1,)
    expected["conv_in.weight"] = (1, 2, 3, 4)
    with pytest.raises(ValueError) as info:
        weights.check_keys(expected, infos, limit=1)
    message = str(info.value)
    assert "missing keys 1: [extra.weight]" in message
    assert "unexpected keys 1: [conv_in.bias]" in message
    assert "shape mismatches 1: [conv_in.weight: expected (1, 2, 3, 4), got (4, 3, 3, 3)]" in message
    many = {f"k{i}": (1,) for i in range(30)}
    with pytest.raises(ValueError, match=r"missing keys 30: \[k0, k1, .*, \.\.\.\]"):
        weights.check_keys(many, {}, limit=3)


def test_plain_reads_equal_safe_open_and_skip_the_memory_map(tmp_path, monkeypatch):
    """numpy/flax loads read each tensor into its own array (no mmap), with safe_open's keys, dtypes and values."""
    from diffusion_core.weights import io

    tensors = {
        "z.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.linspace(-1, 1, 5).astype(np.float16),
        "count": np.array([3, -4], np.int64),
        "bf": np.arange(4).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), framework="numpy") as f:
        expected = [(k, f.get_tensor(k)) for k in f.keys()]
    monkeypatch.setattr(io, "safe_open", None)  # numpy reads must not touch the memory-mapping reader
    got = list(io.iter_tensors(tmp_path, framework="numpy"))
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.astype(np.float64), b.astype(np.float64))
