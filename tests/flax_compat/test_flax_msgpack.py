"""Flax msgpack checkpoints: files in diffusers 0.39's / transformers' Flax layout (built here by their documented
PyTorch -> Flax rules and written by flax.serialization itself) load through the one converter; unsafe files fail."""

from __future__ import annotations

import json
import re

import msgpack
import numpy as np
import pytest
from flax import nnx
from flax.serialization import msgpack_serialize

from diffusion_core.flax import compat, models
from diffusion_core.flax.models import flax_state_to_torch, weight_shapes
from diffusion_core.weights import flax_msgpack
from tests.pipelines import sd_tiny

# diffusers 0.39's Flax VAE attention names (modeling_flax_pytorch_utils.rename_key_and_reshape_tensor)
VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}


def flax_039_tree(state_dict, numbered_as_suffix=True, vae=False):
    """0.39's PyTorch -> Flax conversion, as documented: ``\\w+[.]\\d+`` -> ``_``; conv OIHW -> HWIO; linear .T;
    norm weight -> scale; embedding weight -> embedding. transformers' Flax CLIP keeps ``layers/0`` instead."""
    tree = {}
    for key, value in state_dict.items():
        if numbered_as_suffix:
            key = re.sub(r"(\w+)[.](\d+)", r"\1_\2", key)
        *parents, leaf = key.split(".")
        if vae and parents and parents[-1] in VAE_ATTENTION:
            parents[-1] = VAE_ATTENTION[parents[-1]]
        if value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif value.ndim == 2 and parents[-1].endswith("embedding") and "time" not in parents[-1]:
            leaf = "embedding"
        elif value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight":
            leaf = "scale"
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.ascontiguousarray(value)
    return tree


def write_039_folder(folder, native, name, config, **kwargs):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tree = flax_039_tree(flax_state_to_torch(native), **kwargs)
    (folder / name).write_bytes(msgpack_serialize(tree))


@pytest.mark.parametrize(
    "native_cls,compat_cls,config,kwargs",
    [
        (models.UNet2DConditionModel, compat.FlaxUNet2DConditionModel, {**sd_tiny.SD_UNET, "in_channels": 4}, {}),
        (models.AutoencoderKL, compat.FlaxAutoencoderKL, sd_tiny.SD_VAE, {"vae": True}),
        (models.ControlNetModel, compat.FlaxControlNetModel, sd_tiny.SD_CONTROLNET, {}),
    ],
    ids=["unet", "vae", "controlnet"],
)
def test_diffusers_039_msgpack_loads_through_compat(tmp_path, native_cls, compat_cls, config, kwargs):
    native = native_cls.from_config(config, rngs=nnx.Rngs(4))
    write_039_folder(tmp_path / "m", native, "diffusion_flax_model.msgpack", config, **kwargs)
    _, params = compat_cls.from_pretrained(tmp_path, subfolder="m")
    for a, b in zip(jax_leaves(params), jax_leaves(nnx.state(native)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_transformers_clip_msgpack_loads_and_bf16_is_upcast(tmp_path):
    native = models.CLIPTextModel.from_config(sd_tiny.SD_TEXT, rngs=nnx.Rngs(2))
    state = {f"text_model.{k}": v for k, v in flax_state_to_torch(native).items()}  # transformers' Flax CLIP tree
    tree = flax_039_tree(state, numbered_as_suffix=False)
    import ml_dtypes

    tree["text_model"]["final_layer_norm"]["scale"] = tree["text_model"]["final_layer_norm"]["scale"].astype(
        ml_dtypes.bfloat16
    )
    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(sd_tiny.SD_TEXT))
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    loaded = flax_msgpack.read_flax_msgpack(folder / "flax_model.msgpack")
    assert set(loaded) == set(state)
    assert loaded["text_model.final_layer_norm.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded["text_model.encoder.layers.1.mlp.fc1.weight"], state["text_model.encoder.layers.1.mlp.fc1.weight"]
    )
    model, params = compat.FlaxCLIPTextModel.from_pretrained(folder, _do_init=False)
    ids = np.asarray([[49406, 320, 49407]])
    np.testing.assert_allclose(
        np.asarray(model(ids, params=params)[0]), np.asarray(native(ids).last_hidden_state), atol=1e-2
    )


def test_write_then_read_round_trips(tmp_path):
    native = models.UNet2DConditionModel.from_config({**sd_tiny.SD_UNET, "in_channels": 4}, rngs=nnx.Rngs(1))
    state = flax_state_to_torch(native)
    path = flax_msgpack.write_flax_msgpack(state, weight_shapes(native), tmp_path / "w.msgpack")
    tree = flax_msgpack.read_flax_tree(path)
    assert "down_blocks_1" in tree and "linear_1" in tree["time_embedding"]  # diffusers 0.39's names
    back = flax_msgpack.read_flax_msgpack(path)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value)


def _ext(code, fields):
    return msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"a": {"kernel": _ext(1, [[2, 2], "float32", b"\x00" * 12])}}, "needs 16 bytes"),
        ({"a": {"kernel": _ext(1, [[2], "object", b"\x00" * 16])}}, "dtype"),
        ({"a": {"kernel": _ext(9, [1])}}, "extension type 9"),
        ({"a": {"kernel": "text"}}, "not an array"),
        ([1, 2], "parameter tree"),
    ],
    ids=["short-buffer", "object-dtype", "unknown-ext", "non-array-leaf", "not-a-map"],
)
def test_unsafe_or_malformed_files_raise(tmp_path, payload, match):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))
    with pytest.raises(ValueError, match=match):
        flax_msgpack.read_flax_msgpack(path)


def test_both_backends_load_msgpack_folders_natively(tmp_path):
    """A 0.39 Flax UNet folder (msgpack + config.json, no PyTorch weights) loads in the torch and flax backends."""
    import torch

    from diffusion_core import torch as dc_torch

    config = {**sd_tiny.SD_UNET, "in_channels": 4}
    native = models.UNet2DConditionModel.from_config(config, rngs=nnx.Rngs(8))
    write_039_folder(tmp_path / "unet", native, "diffusion_flax_model.msgpack", config)
    flax_unet = models.UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    torch_unet = dc_torch.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    expected = flax_state_to_torch(native)
    for key, value in flax_state_to_torch(flax_unet).items():
        np.testing.assert_array_equal(value, expected[key])
    torch_state = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    assert set(torch_state) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(torch_state[key], value)
    assert isinstance(torch_unet, torch.nn.Module)


def test_msgpack_only_repo_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """A Hub repo holding only ``diffusion_flax_model.msgpack`` (0.39's Flax repos, e.g. a ``flax`` revision)
    loads by repo id, ``subfolder=`` and ``revision=``, from a Hub-style cache (offline: no network)."""
    import huggingface_hub

    from tests.pipelines import tiny

    config = {**sd_tiny.SD_UNET, "in_channels": 4}
    native = models.UNet2DConditionModel.from_config(config, rngs=nnx.Rngs(9))
    write_039_folder(tmp_path / "src" / "unet", native, "diffusion_flax_model.msgpack", config)
    cache = tmp_path / "cache"
    snapshot = tiny.hub_cache(cache, "tiny/flax-sd", tmp_path / "src", commit="b" * 40)
    (snapshot.parent.parent / "refs" / "flax").write_text("b" * 40)  # the `flax` branch -> the same snapshot
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    expected = flax_state_to_torch(native)
    _, params = compat.FlaxUNet2DConditionModel.from_pretrained("tiny/flax-sd", subfolder="unet", revision="flax")
    for a, b in zip(jax_leaves(params), jax_leaves(nnx.state(native)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded = models.UNet2DConditionModel.from_pretrained("tiny/flax-sd", subfolder="unet")
    for key, value in flax_state_to_torch(loaded).items():
        np.testing.assert_array_equal(value, expected[key])
    with pytest.raises(FileNotFoundError, match="vae"):  # neither safetensors nor msgpack there
        models.UNet2DConditionModel.from_pretrained("tiny/flax-sd", subfolder="vae")


def test_from_pt_means_what_it_meant_in_039(tmp_path):
    """from_pt=True reads PyTorch weights and refuses a msgpack-only folder (naming from_pt); False reads both."""
    config = {**sd_tiny.SD_UNET, "in_channels": 4}
    native = models.UNet2DConditionModel.from_config(config, rngs=nnx.Rngs(10))
    write_039_folder(tmp_path / "flax" / "unet", native, "diffusion_flax_model.msgpack", config)
    native.save_pretrained(tmp_path / "pt" / "unet")  # PyTorch-layout safetensors
    with pytest.raises(FileNotFoundError, match="from_pt=True"):
        compat.FlaxUNet2DConditionModel.from_pretrained(tmp_path / "flax", subfolder="unet", from_pt=True)
    with pytest.raises(ValueError, match="from_pt"):
        compat.FlaxUNet2DConditionModel.from_pretrained(tmp_path / "flax", subfolder="unet", from_pt="yes")
    expected = jax_leaves(nnx.state(native))
    for folder, from_pt in ((tmp_path / "pt", True), (tmp_path / "pt", False), (tmp_path / "flax", False)):
        _, params = compat.FlaxUNet2DConditionModel.from_pretrained(folder, subfolder="unet", from_pt=from_pt)
        for a, b in zip(jax_leaves(params), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
