"""SGM (Stability) SDXL single files -> ``from_single_file`` of both backends' UNet, VAE and two text encoders.

The files are written by ``tests.sgm_layout`` from tiny random diffusers / transformers SDXL components; the
first test checks that diffusers' own ``StableDiffusionXL*Pipeline.from_single_file`` reads them back exactly.
Torch weights must equal the references bit for bit (outputs within rel. L2 1e-5), Flax weights too (outputs
within 1e-4, ``slow``: eager Flax compiles every op).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffusion_core.flax.models import clip_text as flax_clip
from diffusion_core.flax.models.loading import flax_state_to_torch
from diffusion_core.flax.models.unet_2d_condition import UNet2DConditionModel as FlaxUNet
from diffusion_core.flax.models.vae import AutoencoderKL as FlaxAutoencoderKL
from diffusion_core.torch.models import clip_text as torch_clip
from diffusion_core.torch.models.unet_2d_condition import UNet2DConditionModel
from diffusion_core.torch.models.vae import AutoencoderKL
from diffusion_core.weights import single_file as sf
from diffusion_core.weights.lora_sgm import sgm_to_diffusers
from diffusion_core.weights.single_file_keys import unet_plan
from tests import compvis_layout as cl
from tests.sgm_layout import SgmPipe
from tests.test_single_file import _rel_l2

TORCH = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": torch_clip.CLIPTextModel,
         "text_encoder_2": torch_clip.CLIPTextModelWithProjection}  # fmt: skip
FLAX = {"unet": FlaxUNet, "vae": FlaxAutoencoderKL, "text_encoder": flax_clip.CLIPTextModel,
        "text_encoder_2": flax_clip.CLIPTextModelWithProjection}  # fmt: skip
CASES = pytest.mark.parametrize(
    "name, component",
    [("base", c) for c in TORCH] + [("refiner", "unet"), ("refiner", "text_encoder_2")],
)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SgmPipe]:
    root = tmp_path_factory.mktemp("sdxl_single_file")
    return {"base": SgmPipe(root), "refiner": SgmPipe(root, refiner=True)}


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_helper_layout_matches_diffusers_single_file_loader(pipes: dict[str, SgmPipe], name: str) -> None:
    """diffusers 0.42's ``from_single_file(file, config=folder)`` reads every component back exactly."""
    pipe = pipes[name]
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if pipe.refiner else diffusers.StableDiffusionXLPipeline
    loaded = cls.from_single_file(str(pipe.path), config=str(pipe.folder), local_files_only=True)
    for component, state in pipe.states.items():
        theirs = cl.numpy_state(getattr(loaded, component))
        assert theirs.keys() == state.keys(), component
        for key, value in state.items():
            np.testing.assert_array_equal(theirs[key], value, err_msg=f"{component}.{key}")


def test_detect_model_type(pipes: dict[str, SgmPipe]) -> None:
    assert sf.detect_model_type(pipes["base"].path) == "xl_base"
    assert sf.detect_model_type(pipes["refiner"].path) == "xl_refiner"
    assert sf.file_components(pipes["base"].path) == ("unet", "vae", "text_encoder", "text_encoder_2")
    assert sf.file_components(pipes["refiner"].path) == ("unet", "vae", "text_encoder_2")
    assert set(pipes["refiner"].states) == set(sf.file_components(pipes["refiner"].path))


def test_unet_plan_agrees_with_lora_sgm_names(pipes: dict[str, SgmPipe]) -> None:
    """The single-file UNet plan and kohya's SGM name map (``lora_sgm``) rename every SDXL layer alike
    (but the group norms, which LoRAs never target and ``lora_sgm`` does not map)."""
    per_block = pipes["base"].configs["unet"]["layers_per_block"]
    checked = 0
    for entry in unet_plan(pipes["base"].configs["unet"]):
        layer, leaf = entry.source.rsplit(".", 1)
        if layer == "out.0" or layer.endswith(("in_layers.0", "out_layers.0")):
            continue
        checked += 1
        renamed = sgm_to_diffusers(layer.replace(".", "_"), per_block)
        assert renamed == entry.target.rsplit(".", 1)[0].replace(".", "_"), entry.source
        assert leaf == entry.target.rsplit(".", 1)[1]
    assert checked > 100


def _inputs(pipe: SgmPipe, component: str) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    gen = torch.Generator().manual_seed(5)
    if component == "unet":
        cfg = pipe.configs["unet"]
        ids = (cfg["projection_class_embeddings_input_dim"] - 32) // cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.rand(2, ids, generator=gen) * 64}
        args = (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]))
        return (*args, torch.randn(2, 5, cfg["cross_attention_dim"], generator=gen)), {"added_cond_kwargs": added}
    if component == "vae":
        return (torch.randn(2, 3, 8, 8, generator=gen),), {}
    ids = torch.randint(3, 1000, (2, 12), generator=gen)
    ids[:, 0], ids[0, -1], ids[1, 7:] = 49406, 49407, 49407
    return (ids,), {}


def _reference(pipe: SgmPipe, component: str) -> np.ndarray:
    args, kwargs = _inputs(pipe, component)
    with torch.no_grad():
        out = pipe.models[component](*args, **kwargs)
    return _flat(out, component)


def _flat(out: Any, component: str) -> np.ndarray:
    """The output compared: the UNet/VAE sample, the text encoders' last hidden state (and projection)."""
    if component.startswith("text_encoder"):
        parts = [out.last_hidden_state] + ([out.text_embeds] if component == "text_encoder_2" else [])
        return np.concatenate([np.asarray(p.detach() if isinstance(p, torch.Tensor) else p).ravel() for p in parts])
    out = getattr(out, "sample", out)
    return np.asarray(out.detach() if isinstance(out, torch.Tensor) else out)


def _assert_weights(state: dict[str, np.ndarray], pipe: SgmPipe, component: str) -> None:
    assert state.keys() == pipe.states[component].keys()
    for key, value in pipe.states[component].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@CASES
def test_torch_from_single_file(pipes: dict[str, SgmPipe], name: str, component: str) -> None:
    pipe = pipes[name]
    model = TORCH[component].from_single_file(pipe.path, pipe.folder, subfolder=component)
    _assert_weights({k: v.numpy() for k, v in model.state_dict().items()}, pipe, component)
    args, kwargs = _inputs(pipe, component)
    with torch.no_grad():
        assert _rel_l2(_flat(model(*args, **kwargs), component), _reference(pipe, component)) < 1e-5


@CASES
def test_flax_weights_from_single_file(pipes: dict[str, SgmPipe], name: str, component: str) -> None:
    pipe = pipes[name]
    model = FLAX[component].from_single_file(pipe.path, pipe.configs[component])
    _assert_weights(flax_state_to_torch(model), pipe, component)


@pytest.mark.slow  # eager Flax calls compile every op
@pytest.mark.parametrize("component", ["unet", "text_encoder_2"])
def test_flax_outputs_from_single_file(pipes: dict[str, SgmPipe], component: str) -> None:
    pipe = pipes["base"]
    model = FLAX[component].from_single_file(pipe.path, pipe.folder, subfolder=component)
    model.eval()
    args, kwargs = _inputs(pipe, component)
    args = tuple(jnp.asarray(a.numpy()) for a in args)
    kwargs = {k: {n: jnp.asarray(v.numpy()) for n, v in d.items()} for k, d in kwargs.items()}
    assert _rel_l2(_flat(model(*args, **kwargs), component), _reference(pipe, component)) < 1e-4


def test_wrong_layout_errors(pipes: dict[str, SgmPipe], tmp_path: Path) -> None:
    base, refiner = pipes["base"], pipes["refiner"]
    with pytest.raises(ValueError, match="holds no text_encoder .*text_encoder_2"):
        torch_clip.CLIPTextModel.from_single_file(refiner.path, base.configs["text_encoder"])
    sd = cl.Pipe(tmp_path, "sd1", "clip")
    for cls in (torch_clip.CLIPTextModelWithProjection, flax_clip.CLIPTextModelWithProjection):
        with pytest.raises(ValueError, match="holds no text_encoder_2"):
            cls.from_single_file(sd.path, base.configs["text_encoder_2"])
    with pytest.raises(ValueError, match="unexpected keys .*label_emb"):  # an SDXL file, a UNet without text_time
        UNet2DConditionModel.from_single_file(
            base.path, {**base.configs["unet"], "addition_embed_type": None, "cross_attention_dim": 80}
        )
    with pytest.raises(ValueError, match="shape mismatches .*text_projection"):  # base encoder 2, wrong projection
        FLAX["text_encoder_2"].from_single_file(base.path, {**base.configs["text_encoder_2"], "projection_dim": 16})
    with pytest.raises(ValueError, match="does not match the unet config"):  # base file, refiner UNet
        UNet2DConditionModel.from_single_file(base.path, refiner.configs["unet"])
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionModel.from_single_file(base.path, {**base.configs["unet"], "addition_embed_type": "image"})


def test_projection_from_pickle_and_any_framework(pipes: dict[str, SgmPipe], tmp_path: Path) -> None:
    """The transposed ``text_projection`` comes out right from a Lightning ``.ckpt`` and in every framework."""
    pipe = pipes["refiner"]
    expected = pipe.states["text_encoder_2"]["text_projection.weight"]
    path = tmp_path / "refiner.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in pipe.tensors.items()}}, path)
    model = TORCH["text_encoder_2"].from_single_file(path, pipe.configs["text_encoder_2"], allow_pickle=True)
    np.testing.assert_array_equal(model.state_dict()["text_projection.weight"].numpy(), expected)
    for framework in ("numpy", "pt", "flax"):
        tensors = sf.load_single_file(pipe.path, "text_encoder_2", pipe.configs["text_encoder_2"], framework=framework)
        np.testing.assert_array_equal(np.asarray(tensors["text_projection.weight"]), expected, err_msg=framework)


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_convert_cli_writes_every_component_the_file_holds(
    pipes: dict[str, SgmPipe], name: str, tmp_path: Path
) -> None:
    """``diffusion-core convert --verify``: an SDXL base gets both text encoders, a refiner only text_encoder_2."""
    from diffusion_core import cli

    pipe, out = pipes[name], tmp_path / "converted"
    assert cli.main(["convert", str(pipe.path), str(out), "--config", str(pipe.folder), "--verify"]) == 0
    for component, state in pipe.states.items():
        loaded = getattr(
            diffusers if component in ("unet", "vae") else transformers, type(pipe.models[component]).__name__
        )
        loaded = loaded.from_pretrained(out, subfolder=component).state_dict()
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=f"{component}: {key}")
    index = json.loads((out / "model_index.json").read_text())
    assert (index["text_encoder"] == [None, None]) == (name == "refiner")
