"""``from_single_file`` on the models of both backends: CompVis SD 1.x / 2.x files -> our models -> reference outputs.

Checkpoints come from random-weight diffusers / transformers components written in the CompVis layout by
``tests.compvis_layout``. Torch models must match the references to rel. L2 1e-5, Flax models to 1e-4
(their eager first calls compile every op, so the Flax output checks are ``slow``; the default suite checks
the Flax weights bit for bit instead). Errors must be raised from the headers, before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax.models.clip_text import CLIPTextModel as FlaxCLIPTextModel
from diffusion_core.flax.models.loading import flax_state_to_torch
from diffusion_core.flax.models.modeling import torch_shapes
from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel as FlaxUNet
from diffusion_core.flax.models.vae import AutoencoderKL as FlaxAutoencoderKL
from diffusion_core.torch.models.clip_text import CLIPTextModel
from diffusion_core.torch.models.unet_2d import UNet2DModel
from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel
from diffusion_core.torch.models.vae import AutoencoderKL
from diffusion_core.weights import hub, read_pickle_state_dict
from diffusion_core.weights import single_file as sf
from tests import compvis_layout as cl
from tests.compvis_layout import UNET_CASES, Pipe
from tests.test_single_file import _rel_l2

TORCH = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
FLAX = {"unet": FlaxUNet, "vae": FlaxAutoencoderKL, "text_encoder": FlaxCLIPTextModel}
# SD 1.x and 2.x differ in UNet and text encoder (OpenCLIP); their VAEs are the same.
CASES = pytest.mark.parametrize(
    "name, component",
    [("sd1", "unet"), ("sd2", "unet"), ("sd1", "vae"), ("sd1", "text_encoder"), ("sd2", "text_encoder")],
)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pipe]:
    root = tmp_path_factory.mktemp("from_single_file")
    return {"sd1": Pipe(root, "sd1", "clip"), "sd2": Pipe(root, "sd2", "open_clip")}


def _config(pipe: Pipe, component: str) -> dict[str, Any]:
    """The three accepted config forms, one per component: a folder + subfolder, a config.json, a dict."""
    if component == "unet":
        return {"config": pipe.folder, "subfolder": "unet"}
    if component == "vae":
        return {"config": pipe.folder / "vae" / "config.json"}
    return {"config": pipe.text_config}


def _inputs(pipe: Pipe, component: str, name: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    if component == "unet":
        cfg = UNET_CASES[name]
        return (
            torch.randn(2, 4, 8, 8, generator=gen),
            torch.tensor([10, 500]),
            torch.randn(2, 5, cfg["cross_attention_dim"], generator=gen),
        )
    if component == "vae":
        return (torch.randn(2, 3, 8, 8, generator=gen),)
    ids = torch.randint(3, 1000, (2, 12), generator=gen)
    ids[:, 0], ids[0, -1], ids[1, 7:] = 0, 2, 2
    return (ids,)


def _reference(pipe: Pipe, component: str, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.no_grad():
        if component == "unet":
            return pipe.unet(*inputs).sample.numpy()
        if component == "vae":
            return pipe.vae(inputs[0]).sample.numpy()
        return pipe.text_encoder(inputs[0]).last_hidden_state.numpy()


def _output(model: Any, component: str, inputs: tuple[Any, ...]) -> np.ndarray:
    out = model(*inputs)
    if component == "text_encoder":
        out = out.last_hidden_state
    return out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


# ----------------------------------------------------------------------------- torch


@CASES
def test_torch_outputs_match_reference(pipes: dict[str, Pipe], name: str, component: str) -> None:
    pipe = pipes[name]
    model = TORCH[component].from_single_file(pipe.path, **_config(pipe, component))
    assert not model.training
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert state.keys() == pipe.states[component].keys()
    for key, value in pipe.states[component].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    inputs = _inputs(pipe, component, name)
    with torch.no_grad():
        assert _rel_l2(_output(model, component, inputs), _reference(pipe, component, inputs)) < 1e-5


def test_torch_dtype_ema_and_pickle(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    half = AutoencoderKL.from_single_file(pipe.path, pipe.folder / "vae", dtype=torch.float16)
    assert {v.dtype for v in half.state_dict().values()} == {torch.float16}
    ema = UNet2DConditionModel.from_single_file(pipe.path, pipe.configs["unet"], extract_ema=True)
    np.testing.assert_array_equal(ema.conv_in.weight.detach().numpy(), pipe.states["unet"]["conv_in.weight"] + 0.5)
    path = tmp_path / "sd1.ckpt"  # a Lightning checkpoint
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in pipe.tensors.items()}, "global_step": 3}, path)
    for cls in (CLIPTextModel, FlaxCLIPTextModel):
        with pytest.raises(ValueError, match="allow_pickle=True"):
            cls.from_single_file(path, pipe.text_config)
    model = CLIPTextModel.from_single_file(path, pipe.text_config, allow_pickle=True)
    np.testing.assert_array_equal(
        model.state_dict()["final_layer_norm.weight"].numpy(), pipe.states["text_encoder"]["final_layer_norm.weight"]
    )
    flax_model = FlaxCLIPTextModel.from_single_file(path, pipe.text_config, allow_pickle=True)
    assert flax_state_to_torch(flax_model).keys() == pipe.states["text_encoder"].keys()


# ----------------------------------------------------------------------------- flax


@CASES
def test_flax_weights_match_reference(pipes: dict[str, Pipe], name: str, component: str) -> None:
    pipe = pipes[name]
    model = FLAX[component].from_single_file(pipe.path, **_config(pipe, component))
    state = flax_state_to_torch(model)
    assert state.keys() == pipe.states[component].keys()
    for key, value in pipe.states[component].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert torch_shapes(model) == {k: v.shape for k, v in pipe.states[component].items()}


def test_flax_dtype(pipes: dict[str, Pipe]) -> None:
    pipe = pipes["sd2"]
    model = FlaxCLIPTextModel.from_single_file(pipe.path, pipe.text_config, dtype=jnp.bfloat16)
    assert {v.dtype.name for v in flax_state_to_torch(model).values()} == {"bfloat16"}


@pytest.mark.slow  # eager Flax calls compile every op: tens of seconds on a shared CPU
@CASES
def test_flax_outputs_match_reference(pipes: dict[str, Pipe], name: str, component: str) -> None:
    pipe = pipes[name]
    model = FLAX[component].from_single_file(pipe.path, **_config(pipe, component))
    model.eval()
    inputs = _inputs(pipe, component, name)
    ours = _output(model, component, tuple(jnp.asarray(x.numpy()) for x in inputs))
    assert _rel_l2(ours, _reference(pipe, component, inputs)) < 1e-4


# ----------------------------------------------------------------------------- strictness


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any tensor is read from a single file."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a tensor was read before the checkpoint was validated")

    monkeypatch.setattr(sf, "_generate", refuse)


def _broken(pipe: Pipe, tmp_path: Path, drop: str = "", reshape: str = "") -> Path:
    tensors = {k: v for k, v in pipe.tensors.items() if k != drop}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    path = tmp_path / "broken.safetensors"
    cl.write_checkpoint(path, tensors, schedule=False)
    return path


@pytest.mark.parametrize("backend", [TORCH, FLAX], ids=["torch", "flax"])
def test_errors_before_any_read(pipes: dict[str, Pipe], tmp_path: Path, backend: dict, no_reads: None) -> None:
    pipe = pipes["sd1"]
    unet, vae, text = backend["unet"], backend["vae"], backend["text_encoder"]
    missing = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(ValueError, match=r"missing keys 1: \[model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        unet.from_single_file(_broken(pipe, tmp_path, drop=missing), pipe.configs["unet"])
    shaped = "first_stage_model.decoder.conv_out.bias"
    with pytest.raises(ValueError, match="shape mismatches 1: .*decoder.conv_out.bias"):
        vae.from_single_file(_broken(pipe, tmp_path, reshape=shaped), pipe.configs["vae"])
    wider = {**pipe.configs["vae"], "block_out_channels": (4, 8, 16)}
    with pytest.raises(ValueError, match="shape mismatches"):
        vae.from_single_file(pipe.path, wider)
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'"):
        text.from_single_file(pipe.path, {**pipe.text_config, "model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="does not match the unet config"):  # SD 1.x file, SD 2.x config
        unet.from_single_file(pipe.path, pipes["sd2"].configs["unet"])


def test_bad_arguments(pipes: dict[str, Pipe]) -> None:
    pipe = pipes["sd1"]
    with pytest.raises(ValueError, match="UNet2DModel cannot be loaded from a single file"):
        UNet2DModel.from_single_file(pipe.path, pipe.configs["unet"])
    with pytest.raises(ValueError, match="subfolder"):
        AutoencoderKL.from_single_file(pipe.path, pipe.configs["vae"], subfolder="vae")
    with pytest.raises(FileNotFoundError, match="config"):
        AutoencoderKL.from_single_file(pipe.path, pipe.folder, subfolder="text_encoder")
    with pytest.raises(ValueError, match="dtype"):
        AutoencoderKL.from_single_file(pipe.path, pipe.configs["vae"], dtype=torch.int8)
    with pytest.raises(ValueError, match="extract_ema"):
        AutoencoderKL.from_single_file(pipe.path, pipe.configs["vae"], extract_ema="yes")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        AutoencoderKL.from_single_file(pipe.path.with_name("absent.safetensors"), pipe.configs["vae"])
    assert (UNet2DConditionModel.single_file_component, FlaxUNet.single_file_component) == ("unet", "unet")
    assert UNet2DModel.single_file_component is None


# ----------------------------------------------------------------------------- weights-layer helpers


def test_read_pickle_state_dict_lightning(tmp_path: Path) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "step": 3}, "global_step": 3}, path)
    assert list(read_pickle_state_dict(path, unwrap_lightning=True)) == ["a"]
    with pytest.raises(ValueError, match="flat"):
        read_pickle_state_dict(path)


def test_resolve_folder_fetches_only_the_patterns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    calls = []

    def fake_download(repo_id: str, patterns: list[str], revision: str | None, local_files_only: bool) -> Path:
        calls.append((repo_id, patterns, revision, local_files_only))
        return tmp_path

    monkeypatch.setattr(hub, "download_snapshot", fake_download)
    folder = hub.resolve_folder("org/model", ["unet/config.json"], subfolder="unet", revision="r1")
    assert folder == tmp_path / "unet" and calls == [("org/model", ["unet/config.json"], "r1", False)]
    assert hub.resolve_folder(tmp_path, ["x"]) == tmp_path and len(calls) == 1  # local: no download
    with pytest.raises(FileNotFoundError, match="subfolder"):
        hub.resolve_folder(tmp_path, ["x"], subfolder="vae")
    with pytest.raises(ValueError, match="subfolder"):
        hub.resolve_folder(tmp_path, ["x"], subfolder="../up")
