"""Loading files from strangers: corrupt or forged safetensors and malicious pickles give a clear error
naming the file, on both backends, before any large allocation; no code in a checkpoint ever runs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core import weights
from diffusion_core.flax.models import UNet2DModel as FlaxUNet
from diffusion_core.torch.models import UNet2DModel
from diffusion_core.weights import InvalidCheckpointError, read_header
from tests.test_pretrained import UNET

WEIGHTS = "diffusion_pytorch_model.safetensors"
LOADERS = {"torch": UNet2DModel.from_pretrained, "flax": FlaxUNet.from_pretrained}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid tiny UNet2DModel folder written by our own save."""
    folder = tmp_path_factory.mktemp("good") / "unet"
    torch.manual_seed(0)
    UNet2DModel.from_config(UNET).save_pretrained(folder)
    return folder


def _split(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first_key(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _truncate_data(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _truncate_header(path: Path) -> None:
    length, _, _ = _split(path)
    path.write_bytes(path.read_bytes()[: 8 + length // 2])


def _forge_length(value: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + raw[8:])

    return mutate


def _length_short(path: Path) -> None:
    length, _, _ = _split(path)
    _forge_length(length - 10)(path)


def _huge_tensor(path: Path) -> None:
    """A header claiming a 4 TiB tensor in a small file."""
    _, header, data = _split(path)
    key = _first_key(header)
    header[key] = {"dtype": "F32", "shape": [1024, 1024, 1024, 1024], "data_offsets": [0, 4 * 1024**4]}
    _write(path, header, data)


def _overlap(path: Path) -> None:
    _, header, data = _split(path)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[keys[0]], header[keys[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    _write(path, header, data)


def _trailing(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _bad_json(path: Path) -> None:
    length, _, data = _split(path)
    path.write_bytes(struct.pack("<Q", length) + b"{" * length + data)


def _bad_dtype(path: Path) -> None:
    _, header, data = _split(path)
    header[_first_key(header)]["dtype"] = "F128"
    _write(path, header, data)


def _tiny(path: Path) -> None:
    path.write_bytes(b"\x01\x02")


MUTATIONS = {
    "truncated-data": (_truncate_data, "truncated"),
    "truncated-header": (_truncate_header, "runs past the end"),
    "length-2**62": (_forge_length(2**62), "exceeds"),
    "length-10-short": (_length_short, "not valid UTF-8 JSON|trailing|gap"),
    "4-TiB-tensor": (_huge_tensor, "truncated|gap|overlaps"),
    "overlapping-offsets": (_overlap, "overlaps|gap"),
    "trailing-bytes": (_trailing, "trailing bytes"),
    "invalid-json": (_bad_json, "not valid UTF-8 JSON"),
    "unknown-dtype": (_bad_dtype, "unknown dtype 'F128'"),
    "two-bytes": (_tiny, "too short"),
}


@pytest.mark.parametrize("backend", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_corrupt_safetensors_is_a_clear_error_naming_the_file(good, tmp_path, case, backend):
    folder = tmp_path / "unet"
    shutil.copytree(good, folder)
    mutate, reason = MUTATIONS[case]
    mutate(folder / WEIGHTS)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCheckpointError, match=reason) as info:
            LOADERS[backend](folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(folder / WEIGHTS) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert peak < 64 * 2**20  # nothing near the size a forged header claims was allocated


def test_valid_file_header_round_trips(good):
    header = read_header(good / WEIGHTS)
    assert header.metadata == {"format": "pt"}
    infos = weights.file_infos(good / WEIGHTS)
    assert {k: (e.dtype, e.shape) for k, e in header.tensors.items()} == infos
    assert sum(e.end - e.start for e in header.tensors.values()) + header.data_start == (good / WEIGHTS).stat().st_size


def _fuzz_cases(path: Path, count: int, seed: int) -> list[tuple[str, bytes]]:
    """Seeded mutations of a valid file: single-bit flips in the length and header, truncation at every
    header boundary, random byte runs written over the header."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(seed)
    cases = [(f"cut-{n}", raw[:n]) for n in (0, 1, 7, 8, 9, 8 + length - 1, 8 + length, 8 + length + 1)]
    for i in range(count):
        data = bytearray(raw)
        if i % 3 == 0:  # one bit anywhere in the length prefix or the header
            pos = int(rng.integers(0, 8 + length))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        elif i % 3 == 1:  # a digit changed inside the header (shapes, offsets)
            digits = [j for j in range(8, 8 + length) if chr(data[j]).isdigit()]
            pos = digits[int(rng.integers(0, len(digits)))]
            data[pos] = ord(str(int(rng.integers(0, 10))))
        else:  # a run of random bytes over the header
            pos = int(rng.integers(8, 8 + length - 8))
            data[pos : pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        cases.append((f"mutation-{i}", bytes(data)))
    return cases


def test_fuzzed_headers_give_only_documented_errors(good, tmp_path):
    """Mutated files either load (a flip that changes nothing checkable) or raise InvalidCheckpointError."""
    path = tmp_path / WEIGHTS
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in _fuzz_cases(good / WEIGHTS, 300, seed=0):
        path.write_bytes(data)
        try:
            tensors = weights.load_tensors(weights.WeightFiles(tmp_path, (path,)))
        except InvalidCheckpointError as e:
            assert str(path) in str(e), name
            outcomes["refused"] += 1
            continue
        header = read_header(path)  # a load that succeeds gives exactly what its (valid) header says
        assert {k: (str(a.dtype), a.shape) for k, a in tensors.items()} == {
            k: (e.dtype, e.shape) for k, e in header.tensors.items()
        }, name
        assert sum(a.nbytes for a in tensors.values()) <= len(data), name
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 100  # the fuzzer really reached the checks


@pytest.mark.parametrize("backend", sorted(LOADERS))
def test_fuzzed_files_through_both_model_loaders(good, tmp_path, backend):
    folder = tmp_path / "unet"
    shutil.copytree(good, folder)
    for name, data in _fuzz_cases(good / WEIGHTS, 12, seed=1):
        (folder / WEIGHTS).write_bytes(data)
        try:
            LOADERS[backend](folder)
        except ValueError as e:  # InvalidCheckpointError, or the strict key/shape check of the model
            assert isinstance(e, InvalidCheckpointError) or "does not match the model" in str(e), (name, e)


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for a payload in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("backend", sorted(LOADERS))
def test_pickle_that_runs_code_is_refused_and_never_runs(good, tmp_path, backend):
    folder, marker = tmp_path / "unet", tmp_path / "pwned"
    folder.mkdir()
    shutil.copy2(good / "config.json", folder / "config.json")
    state = dict(weights.load_tensors(good, framework="pt"))
    state["payload"] = _RunsCode(str(marker))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
        LOADERS[backend](folder)
    with pytest.raises(InvalidCheckpointError, match="cannot be loaded safely") as info:
        LOADERS[backend](folder, allow_pickle=True)
    assert str(folder / "diffusion_pytorch_model.bin") in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("backend", sorted(LOADERS))
def test_check_finite_refuses_nan_weights_only_when_asked(good, tmp_path, backend):
    folder = tmp_path / "unet"
    shutil.copytree(good, folder)
    state = dict(weights.load_tensors(folder))
    key = sorted(state)[3]
    state[key] = state[key].copy()
    state[key].flat[0] = np.nan
    weights.save_state_dict(state, folder)
    LOADERS[backend](folder)  # off by default: a NaN is a value, not a malformed file
    with pytest.raises(InvalidCheckpointError, match=f"tensor '{key}' holds NaN or inf values"):
        LOADERS[backend](folder, check_finite=True)
    LOADERS[backend](good, check_finite=True)  # a healthy checkpoint passes the check
    with pytest.raises(ValueError, match="check_finite must be a bool"):
        LOADERS[backend](good, check_finite="yes")
