"""CompVis / SD 1.x-2.x single-file checkpoints: key plans, layouts, strictness, laziness, model outputs.

Checkpoints are written from random-weight diffusers / transformers models by ``tests.compvis_layout``
(an independent inverse map, itself checked against diffusers' own single-file loader), then read
back through ``diffusion_core.weights.single_file`` and compared key by key and output by output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
import transformers

from diffusion_core.weights import single_file as sf
from tests import compvis_layout as cl
from tests.compvis_layout import UNET_CASES, Pipe


def _rel_l2(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pipe]:
    root = tmp_path_factory.mktemp("single_file")
    return {
        "sd1": Pipe(root, "sd1", "clip"),
        "sd2": Pipe(root, "sd2", "open_clip"),
        "sd2_conv_proj": Pipe(root, "sd2", "open_clip", proj_as_conv=True),
        "inpaint_classes": Pipe(root, "inpaint_classes", "clip"),
    }


# ----------------------------------------------------------------------------- the helper vs diffusers' loader


@pytest.mark.parametrize("name", ["sd1", "sd2"])
@pytest.mark.parametrize("component", ["unet", "vae"])
def test_helper_layout_matches_diffusers_single_file_loader(pipes: dict[str, Pipe], name: str, component: str) -> None:
    """diffusers 0.42.1's own ``from_single_file`` (local config, no network) reads the helper's file back exactly."""
    pipe = pipes[name]
    cls = diffusers.UNet2DConditionModel if component == "unet" else diffusers.AutoencoderKL
    loaded = cls.from_single_file(str(pipe.path), config=str(pipe.folder), subfolder=component, local_files_only=True)
    state = cl.numpy_state(loaded)
    assert state.keys() == pipe.states[component].keys()
    for key, value in pipe.states[component].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_text_helper_layout_matches_diffusers_converters(pipes: dict[str, Pipe], name: str) -> None:
    """diffusers' CLIP / OpenCLIP converters turn the helper's text encoder back into the transformers weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    pipe = pipes[name]
    tensors = {k: torch.from_numpy(v) for k, v in pipe.compvis["text_encoder"].items()}
    if name == "sd1":
        converted = convert_ldm_clip_checkpoint(tensors)
        del converted["text_model.embeddings.position_ids"]  # a buffer, not a weight
    else:  # drop the unused last resblock, which diffusers skips only at full size (index 23)
        converted = convert_open_clip_checkpoint(
            pipe.text_encoder, {k: v for k, v in tensors.items() if ".resblocks.2." not in k}
        )
    converted = {k.removeprefix("text_model."): v.numpy() for k, v in converted.items()}
    assert converted.keys() == pipe.states["text_encoder"].keys()
    for key, value in pipe.states["text_encoder"].items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2_conv_proj", "inpaint_classes"])
@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_round_trip_keys_shapes_values(pipes: dict[str, Pipe], name: str, component: str) -> None:
    pipe = pipes[name]
    original = pipe.states[component]
    infos = sf.single_file_infos(pipe.path, component, pipe.configs[component])
    assert infos == {k: ("float32", v.shape) for k, v in original.items()}
    keys = []
    for key, value in sf.iter_single_file(pipe.path, component, pipe.configs[component]):
        keys.append(key)
        assert isinstance(value, np.ndarray) and value.dtype == np.float32
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    assert sorted(keys) == sorted(original) and len(keys) == len(set(keys))


def test_config_from_folder_and_file(pipes: dict[str, Pipe]) -> None:
    pipe = pipes["sd1"]
    expected = sf.single_file_infos(pipe.path, "unet", pipe.configs["unet"])
    assert sf.single_file_infos(pipe.path, "unet", pipe.folder / "unet") == expected
    assert (
        sf.single_file_infos(pipe.path, "vae", pipe.folder / "vae" / "config.json").keys() == pipe.states["vae"].keys()
    )


def test_ema_weights(pipes: dict[str, Pipe]) -> None:
    pipe = pipes["sd1"]
    ema = sf.load_single_file(pipe.path, "unet", pipe.configs["unet"], extract_ema=True)
    assert ema.keys() == pipe.states["unet"].keys()
    for key, value in pipe.states["unet"].items():
        np.testing.assert_array_equal(ema[key], value + np.float32(0.5), err_msg=key)
    # EMA applies to the UNet only; without EMA keys the regular weights load, with a warning.
    vae = sf.load_single_file(pipe.path, "vae", pipe.configs["vae"], extract_ema=True)
    np.testing.assert_array_equal(vae["encoder.conv_in.weight"], pipe.states["vae"]["encoder.conv_in.weight"])
    tensors = {k: v for k, v in pipe.tensors.items() if not k.startswith("model_ema.")}
    path = pipe.path.with_name("no_ema.safetensors")
    cl.write_checkpoint(path, tensors, schedule=False)
    with pytest.warns(UserWarning, match="no EMA weights"):
        plain = sf.load_single_file(path, "unet", pipe.configs["unet"], extract_ema=True)
    np.testing.assert_array_equal(plain["conv_in.weight"], pipe.states["unet"]["conv_in.weight"])


# ----------------------------------------------------------------------------- loaded models' outputs


@pytest.mark.parametrize("name", ["sd1", "sd2", "inpaint_classes"])
def test_unet_output_matches_diffusers(pipes: dict[str, Pipe], name: str) -> None:
    pipe = pipes[name]
    cfg = UNET_CASES[name]
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    converted = sf.load_single_file(pipe.path, "unet", pipe.configs["unet"], framework="pt")
    model.load_state_dict(converted, strict=True)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, cfg.get("in_channels", 4), 8, 8, generator=gen)
    text = torch.randn(2, 5, cfg["cross_attention_dim"], generator=gen)
    labels = {"class_labels": torch.tensor([1, 3])} if "num_class_embeds" in cfg else {}
    with torch.no_grad():
        ours = model(sample, 10, text, **labels).sample
        ref = pipe.unet(sample, 10, text, **labels).sample
    assert _rel_l2(ours, ref) < 1e-6


def test_vae_output_torch(pipes: dict[str, Pipe]) -> None:
    from diffusion_core.torch.models.vae import AutoencoderKL

    pipe = pipes["sd1"]
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = AutoencoderKL.from_config(pipe.configs["vae"]).eval()
    model.load_state_dict(sf.load_single_file(pipe.path, "vae", pipe.configs["vae"], framework="pt"), strict=True)
    with torch.no_grad():
        assert _rel_l2(model(image), pipe.vae(image).sample) < 1e-5


def _flax_vae(pipe: Pipe) -> Any:
    import jax.numpy as jnp
    from flax import nnx

    from diffusion_core.flax.models.loading import load_torch_state_dict
    from diffusion_core.flax.models.vae import AutoencoderKL

    model = nnx.eval_shape(lambda: AutoencoderKL.from_config(pipe.configs["vae"], dtype=jnp.float32))
    load_torch_state_dict(model, sf.iter_single_file(pipe.path, "vae", pipe.configs["vae"]))  # streamed, strict
    model.eval()
    return model


def test_vae_loads_into_flax(pipes: dict[str, Pipe]) -> None:
    from diffusion_core.flax.models.loading import flax_state_to_torch

    pipe = pipes["sd1"]
    state = flax_state_to_torch(_flax_vae(pipe))
    assert state.keys() == pipe.states["vae"].keys()
    for key, value in pipe.states["vae"].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.slow  # the first eager Flax VAE call compiles every op: 10-25 s on a shared CPU
def test_vae_output_flax(pipes: dict[str, Pipe]) -> None:
    import jax.numpy as jnp

    pipe = pipes["sd1"]
    model = _flax_vae(pipe)
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pipe.vae(image).sample
    assert _rel_l2(model(jnp.asarray(image.numpy())), ref) < 1e-4


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_text_encoder_output_matches_transformers(pipes: dict[str, Pipe], name: str) -> None:
    from diffusion_core.torch.models.clip_text import CLIPTextModel

    pipe = pipes[name]
    model = CLIPTextModel(pipe.text_config).eval()
    converted = sf.iter_single_file(pipe.path, "text_encoder", pipe.text_config, framework="torch")
    model.load_state_dict(dict(converted), strict=True)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[0, -1], ids[1, 7:] = 0, 2, 2
    with torch.no_grad():
        ours = model(ids).last_hidden_state
        ref = pipe.text_encoder(ids).last_hidden_state
    assert _rel_l2(ours, ref) < 1e-5


# ----------------------------------------------------------------------------- frameworks, dtypes, formats


def test_frameworks_and_dtype(pipes: dict[str, Pipe]) -> None:
    import jax

    pipe = pipes["sd2"]
    key = "encoder.layers.1.self_attn.k_proj.weight"  # a row block of a fused in_proj
    expected = pipe.states["text_encoder"][key].astype(np.float16)
    for framework, kind in (("pt", torch.Tensor), ("flax", jax.Array), ("numpy", np.ndarray)):
        tensors = sf.load_single_file(pipe.path, "text_encoder", pipe.text_config, framework=framework, dtype="float16")
        assert isinstance(tensors[key], kind)
        value = tensors[key].numpy() if framework == "pt" else np.asarray(tensors[key])
        assert value.dtype == np.float16
        np.testing.assert_array_equal(value, expected)
    bf16 = sf.load_single_file(pipe.path, "vae", pipe.configs["vae"], dtype="bfloat16")
    assert bf16["decoder.conv_out.weight"].dtype.name == "bfloat16"


def test_pickle_checkpoints(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    path = tmp_path / "model.ckpt"
    state = {k: torch.from_numpy(v) for k, v in pipe.tensors.items()}
    torch.save({"state_dict": state, "global_step": 7}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        sf.single_file_infos(path, "unet", pipe.configs["unet"])
    with pytest.raises(ValueError, match="allow_pickle=True"):
        sf.iter_single_file(path, "vae", pipe.configs["vae"])
    for component in ("unet", "vae", "text_encoder"):
        loaded = sf.load_single_file(path, component, pipe.configs[component], allow_pickle=True)
        assert loaded.keys() == pipe.states[component].keys()
        for key, value in pipe.states[component].items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    open_clip = pipes["sd2"]
    path = tmp_path / "sd2.ckpt"
    torch.save({k: torch.from_numpy(v) for k, v in open_clip.tensors.items()}, path)  # flat, no "state_dict"
    loaded = sf.load_single_file(path, "text_encoder", open_clip.text_config, allow_pickle=True, framework="pt")
    for key, value in open_clip.states["text_encoder"].items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_state_dict_prefixed_safetensors(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    path = tmp_path / "prefixed.safetensors"
    cl.write_checkpoint(path, {f"state_dict.{k}": v for k, v in pipe.tensors.items()}, schedule=False)
    loaded = sf.load_single_file(path, "unet", pipe.configs["unet"], extract_ema=True)
    np.testing.assert_array_equal(loaded["conv_out.bias"], pipe.states["unet"]["conv_out.bias"] + np.float32(0.5))
    assert sf.detect_model_type(path) == "v1"


def test_vae_prefix(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    path = tmp_path / "vae_only.safetensors"
    renamed = {"vae." + k.removeprefix("first_stage_model."): v for k, v in pipe.compvis["vae"].items()}
    cl.write_checkpoint(path, renamed, schedule=False)
    loaded = sf.load_single_file(path, "vae", pipe.configs["vae"])
    np.testing.assert_array_equal(loaded["decoder.up_blocks.0.resnets.1.conv2.weight"],
                                  pipe.states["vae"]["decoder.up_blocks.0.resnets.1.conv2.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="no unet weights"):
        sf.single_file_infos(path, "unet", pipe.configs["unet"])
    with pytest.raises(ValueError, match="holds no text_encoder"):
        sf.single_file_infos(path, "text_encoder", pipe.text_config)


# ----------------------------------------------------------------------------- strictness


def _rewrite(pipe: Pipe, path: Path, drop: str | None = None, add: dict[str, np.ndarray] | None = None) -> Path:
    tensors = {k: v for k, v in pipe.tensors.items() if k != drop}
    cl.write_checkpoint(path, tensors, add or {}, schedule=False)
    return path


def test_missing_key_raises(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    path = _rewrite(pipe, tmp_path / "a.safetensors", drop="model.diffusion_model.output_blocks.2.1.proj_in.weight")
    with pytest.raises(ValueError, match=r"missing keys 1: \[model\.diffusion_model\.output_blocks\.2\.1\.proj_in"):
        sf.single_file_infos(path, "unet", pipe.configs["unet"])
    with pytest.raises(ValueError, match="up_blocks.1.attentions.0.proj_in.weight"):
        sf.iter_single_file(path, "unet", pipe.configs["unet"])  # raised before the first tensor is read
    assert sf.single_file_infos(path, "vae", pipe.configs["vae"])  # other components still load
    # A config asking for more than the file holds: every absent key is listed.
    bigger = {**pipe.configs["unet"], "transformer_layers_per_block": 2}
    with pytest.raises(ValueError, match=r"missing keys \d+: .*transformer_blocks\.1\.attn1\.to_q\.weight"):
        sf.single_file_infos(pipe.path, "unet", bigger)


def test_unexpected_key_raises(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd2"]
    extra = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.extra.weight": np.zeros(2, np.float32),
        "first_stage_model.encoder.mystery": np.zeros(2, np.float32),
        "cond_stage_model.model.transformer.resblocks.0.attn.weird": np.zeros(2, np.float32),
        "some_other_model.weight": np.zeros(2, np.float32),  # outside every prefix: ignored
        "cond_stage_model.model.visual.proj": np.zeros(2, np.float32),  # OpenCLIP's image tower: ignored
    }
    path = _rewrite(pipe, tmp_path / "b.safetensors", add=extra)
    for component, key in zip(("unet", "vae", "text_encoder"), list(extra)[:3], strict=True):
        with pytest.raises(ValueError, match=rf"unexpected keys 1: \[{key.replace('.', '[.]')}\]"):
            sf.single_file_infos(path, component, pipe.configs[component])


def test_wrong_shape_raises(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd2"]
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    bad = {key: np.zeros((8, 7, 1, 1), np.float32), "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias":
           np.zeros(95, np.float32)}  # fmt: skip
    path = _rewrite(pipe, tmp_path / "c.safetensors", add=bad)
    with pytest.raises(ValueError, match=r"shape mismatches 1: .*mid\.attn_1\.q\.weight -> .*to_q\.weight: "
                       r"expected \(8, 8\), got \(8, 7, 1, 1\)"):  # fmt: skip
        sf.single_file_infos(path, "vae", pipe.configs["vae"])
    with pytest.raises(ValueError, match=r"shape mismatches 3: .*in_proj_bias rows 1/3"):
        sf.single_file_infos(path, "text_encoder", pipe.text_config)
    wider = {**pipe.configs["unet"], "cross_attention_dim": 24}
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight: expected \(8, 24\), got \(8, 16\)"):
        sf.single_file_infos(pipe.path, "unet", wider)


def test_bad_arguments(pipes: dict[str, Pipe], tmp_path: Path) -> None:
    pipe = pipes["sd1"]
    with pytest.raises(ValueError, match="component must be one of"):
        sf.single_file_infos(pipe.path, "scheduler", {})
    with pytest.raises(ValueError, match="framework must be one of"):
        sf.iter_single_file(pipe.path, "vae", pipe.configs["vae"], framework="tf")
    with pytest.raises(ValueError, match="config: expected a dict"):
        sf.single_file_infos(pipe.path, "vae", 3)
    with pytest.raises(FileNotFoundError, match="config"):
        sf.single_file_infos(pipe.path, "vae", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        sf.single_file_infos(tmp_path / "absent.safetensors", "vae", pipe.configs["vae"])
    for text in (pipe, pipes["sd2"]):  # HF CLIP and OpenCLIP layouts
        with pytest.raises(ValueError, match="integer fields"):
            sf.single_file_infos(text.path, "text_encoder", {"hidden_size": 32})
    for field, value in (("addition_embed_type", "image"), ("down_block_types", ("SimpleDown",) * 2),
                         ("mid_block_type", "UNetMidBlock2D"), ("layers_per_block", (1, 2, 3))):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            sf.single_file_infos(pipe.path, "unet", {**pipe.configs["unet"], field: value})
    with pytest.raises(ValueError, match="up_block_types"):
        sf.single_file_infos(pipe.path, "vae", {**pipe.configs["vae"], "up_block_types": ("UpDecoderBlock2D",)})


# ----------------------------------------------------------------------------- laziness


def test_iteration_is_lazy(pipes: dict[str, Pipe], monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation reads headers only; each tensor is read when the generator reaches it."""
    reads: list[str] = []
    real_open = sf.safe_open

    class Counting:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Counting:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, key: str) -> Any:
            reads.append(key)
            return self.inner.get_tensor(key)

        def get_slice(self, key: str) -> Any:
            reads.append(key)
            return self.inner.get_slice(key)

    monkeypatch.setattr(sf, "safe_open", Counting)
    pipe = pipes["sd2"]
    stream = sf.iter_single_file(pipe.path, "text_encoder", pipe.text_config)
    assert reads == []
    first = next(stream)
    assert len(reads) == 1 and first[0] == "embeddings.token_embedding.weight"
    count = 1 + sum(1 for _ in stream)
    assert len(reads) == count == len(pipe.states["text_encoder"])


# ----------------------------------------------------------------------------- model-type detection


def _infos(conv_in: int = 4, to_k: int = 768, **extra: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    infos = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, conv_in, 3, 3),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, to_k),
        sf.PROBES["v1"]: (320, 640, 1, 1),
    }
    return {**infos, **extra}


@pytest.mark.parametrize(
    ("infos", "expected"),
    [
        (_infos(), "v1"),
        (_infos(to_k=1024), "v2"),
        (_infos(conv_in=9), "inpainting"),
        (_infos(conv_in=9, to_k=1024), "inpainting_v2"),
        (_infos(conv_in=8), "pix2pix"),
        (_infos(**{sf.PROBES["upscale"]: (256,)}), "upscale"),
        (_infos(**{sf.PROBES["controlnet"]: (1280, 320)}), "controlnet"),
        ({sf.PROBES["xl_base"]: ("float16", (1280,)), "model.diffusion_model.x": ("float16", (1,))}, "xl_base"),
        ({sf.PROBES["xl_refiner"]: (1280,)}, "xl_refiner"),
        ({**_infos(conv_in=9), sf.PROBES["xl_base"]: (77, 1280)}, "xl_inpaint"),
        ({f"state_dict.{k}": v for k, v in _infos(to_k=1024).items()}, "v2"),
    ],
)
def test_detect_model_type(infos: dict[str, Any], expected: str) -> None:
    assert sf.detect_model_type(infos) == expected


def test_detect_model_type_of_files(pipes: dict[str, Pipe]) -> None:
    assert sf.detect_model_type(pipes["sd1"].path) == "v1"
    assert sf.detect_model_type(str(pipes["inpaint_classes"].path)) == "inpainting"
    with pytest.raises(ValueError, match="not a CompVis"):
        sf.detect_model_type({"encoder.conv_in.weight": (4, 3, 3, 3)})


def test_open_clip_penultimate_layer_count(pipes: dict[str, Pipe]) -> None:
    """Resblocks past num_hidden_layers are skipped on purpose; fewer resblocks than layers is an error."""
    pipe = pipes["sd2"]
    fewer = sf.single_file_infos(pipe.path, "text_encoder", {**pipe.text_config, "num_hidden_layers": 1})
    assert not any(k.startswith("encoder.layers.1.") for k in fewer)
    with pytest.raises(ValueError, match=r"missing keys .*resblocks\.3\.attn\.in_proj_weight"):
        sf.single_file_infos(pipe.path, "text_encoder", {**pipe.text_config, "num_hidden_layers": 4})
    assert json.loads(json.dumps(pipe.text_config))["num_hidden_layers"] == 2


# ----------------------------------------------------------------------------- full-size plans (headers only)

FULL_UNETS: dict[str, dict[str, Any]] = {
    "sd15": {"cross_attention_dim": 768},  # diffusers' defaults are SD 1.x's
    "sd2": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    "x4_upscaler": {
        "in_channels": 7,
        "block_out_channels": (256, 512, 512, 1024),
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        "num_class_embeds": 1000,
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "only_cross_attention": (True, True, True, False),
    },
}


@pytest.mark.parametrize("name", sorted(FULL_UNETS))
def test_full_size_unet_plans_match_diffusers(name: str) -> None:
    """Real SD configs: the plan's keys and shapes are exactly diffusers' (built on the meta device)."""
    from diffusion_core.weights.single_file_keys import unet_plan

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**FULL_UNETS[name])
    plan = unet_plan(dict(model.config))
    assert {e.target: e.shape for e in plan} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources = {sf.UNET_PREFIX + e.source for e in plan}
    assert sf.PROBES["v1"] in sources and (sf.PROBES["upscale"] in sources) == (name == "x4_upscaler")


def test_full_size_vae_and_text_plans_match_reference() -> None:
    from diffusion_core.weights.single_file_keys import open_clip_plan, vae_plan

    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
            hidden_act="gelu", projection_dim=1024))  # fmt: skip
    for plan, model in ((vae_plan(dict(vae.config)), vae), (open_clip_plan(text.config.to_dict()), text)):
        assert {e.target: e.shape for e in plan} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
