"""CLIP text encoder checkpoints in transformers' layout: transformers 4/5 files in, transformers-loadable files out."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffusion_core.flax.models.clip_text import CLIPTextModel as FlaxCLIPTextModel
from diffusion_core.flax.models.clip_text import CLIPTextModelWithProjection as FlaxCLIPTextModelWithProjection
from diffusion_core.torch.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from tests.config_files import assert_same_config_file
from tests.torch_models.test_clip_text import LEGACY, _inputs

CFG: dict[str, Any] = {**LEGACY, "num_hidden_layers": 2}
WEIGHTS = "model.safetensors"
KINDS = {
    "plain": (transformers.CLIPTextModel, CLIPTextModel, FlaxCLIPTextModel),
    "projection": (
        transformers.CLIPTextModelWithProjection,
        CLIPTextModelWithProjection,
        FlaxCLIPTextModelWithProjection,
    ),
}


def _ref(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return KINDS[kind][0](transformers.CLIPTextConfig(**CFG)).eval()


def _rel_l2(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _main_output(out: Any) -> Any:
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def _check_outputs(ref: torch.nn.Module, torch_model: Any = None, flax_model: Any = None) -> None:
    """Both given models reproduce ``ref``'s last hidden state and pooled/projected output."""
    input_ids, mask = _inputs(CFG)
    with torch.no_grad():
        want = ref(input_ids, attention_mask=mask)
    if torch_model is not None:
        with torch.no_grad():
            got = torch_model(input_ids, attention_mask=mask)
        assert _rel_l2(got.last_hidden_state, want.last_hidden_state) < 1e-5
        assert _rel_l2(_main_output(got), _main_output(want)) < 1e-5
    if flax_model is not None:
        got = flax_model(jnp.asarray(input_ids.numpy()), jnp.asarray(mask.numpy()))
        assert _rel_l2(got.last_hidden_state, want.last_hidden_state) < 1e-4
        assert _rel_l2(_main_output(got), _main_output(want)) < 1e-4


def _same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "save_kwargs", [{}, {"max_shard_size": "20KB"}, {"variant": "fp16"}], ids=["single", "sharded", "fp16"]
)
def test_transformers_checkpoint_loads_in_both_backends(tmp_path: Path, kind: str, save_kwargs: dict) -> None:
    ref = _ref(kind)
    if "variant" in save_kwargs:
        ref = ref.half().float()  # weights exactly representable in the fp16 file
        copy.deepcopy(ref).half().save_pretrained(tmp_path, **save_kwargs)
    else:
        ref.save_pretrained(tmp_path, **save_kwargs)
    if "max_shard_size" in save_kwargs:
        assert (tmp_path / f"{WEIGHTS}.index.json").is_file()
    variant = save_kwargs.get("variant")
    _, torch_cls, flax_cls = KINDS[kind]
    ours = torch_cls.from_pretrained(tmp_path, variant=variant)
    assert not ours.training and {p.dtype for p in ours.parameters()} == {torch.float32}
    _check_outputs(ref, ours, flax_cls.from_pretrained(tmp_path, variant=variant))


@pytest.mark.parametrize("kind", list(KINDS))
def test_ours_saved_loads_in_transformers_with_same_config_bytes(tmp_path: Path, kind: str) -> None:
    ref = _ref(kind)
    ref.save_pretrained(tmp_path / "ref")
    ref_cls, torch_cls, flax_cls = KINDS[kind]
    torch_cls.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "torch", max_shard_size="20KB")
    flax_cls.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "flax")
    for name in ("torch", "flax"):
        assert_same_config_file(tmp_path / name / "config.json", tmp_path / "ref" / "config.json")
        again = ref_cls.from_pretrained(tmp_path / name).eval()
        _same_weights(again.state_dict(), ref.state_dict())
        _check_outputs(ref, again)
    assert (tmp_path / "torch" / f"{WEIGHTS}.index.json").is_file()
    assert (tmp_path / "flax" / WEIGHTS).is_file()


def test_bfloat16_save_records_dtype_and_round_trips(tmp_path: Path) -> None:
    ref = _ref("projection")
    ref.save_pretrained(tmp_path / "ref")
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path / "ref", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ours.save_pretrained(tmp_path / "bf16", variant="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    flax_model = FlaxCLIPTextModelWithProjection.from_pretrained(tmp_path / "bf16", variant="bf16", dtype=jnp.bfloat16)
    assert flax_model.text_projection.kernel.dtype == jnp.bfloat16
    flax_model.save_pretrained(tmp_path / "flax_bf16")
    again = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "flax_bf16")
    assert again.text_projection.weight.dtype == torch.bfloat16
    _same_weights(again.state_dict(), ours.state_dict())


def _transformers4_folder(folder: Path, kind: str, state: dict[str, torch.Tensor], pickle: bool = False) -> None:
    """A checkpoint as transformers 4 wrote it: ``text_model.`` prefix everywhere and the position_ids buffer."""
    if kind == "plain":
        state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(CFG.get("max_position_embeddings", 77))[None]
    folder.mkdir(parents=True)
    if pickle:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS, metadata={"format": "pt"})
    config = {**transformers.CLIPTextConfig(**CFG).to_dict(), "torch_dtype": "float32"}
    config.update(architectures=[KINDS[kind][0].__name__], transformers_version="4.41.2")
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers4_checkpoint_with_prefix_and_position_ids_loads(tmp_path: Path, kind: str) -> None:
    ref = _ref(kind)
    _transformers4_folder(tmp_path / "tf4", kind, ref.state_dict())
    _, torch_cls, flax_cls = KINDS[kind]
    ours = torch_cls.from_pretrained(tmp_path / "tf4")
    _check_outputs(ref, ours, flax_cls.from_pretrained(tmp_path / "tf4"))
    ours.save_pretrained(tmp_path / "ours")  # written back in transformers 5's layout
    _same_weights(load_file(tmp_path / "ours" / WEIGHTS), ref.state_dict())


@pytest.mark.parametrize("kind", list(KINDS))
def test_pickle_checkpoint_needs_allow_pickle(tmp_path: Path, kind: str) -> None:
    ref = _ref(kind)
    tmp_path = tmp_path / "tf4"
    _transformers4_folder(tmp_path, kind, ref.state_dict(), pickle=True)
    _, torch_cls, flax_cls = KINDS[kind]
    for cls in (torch_cls, flax_cls):
        with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
            cls.from_pretrained(tmp_path)
    _check_outputs(
        ref,
        torch_cls.from_pretrained(tmp_path, allow_pickle=True),
        flax_cls.from_pretrained(tmp_path, allow_pickle=True),
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        torch_cls.from_pretrained(tmp_path, allow_pickle="yes")


def _edited(state: dict[str, torch.Tensor], edit: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if edit == "missing":
        del state["final_layer_norm.bias"]
    elif edit == "unexpected":
        state["final_layer_norm.extra"] = torch.zeros(2)
    elif edit == "shape":
        state["final_layer_norm.bias"] = torch.zeros(5)
    elif edit == "prefixed_twice":  # both spellings of one key: ambiguous, never silently picked
        state["text_model.final_layer_norm.bias"] = state["final_layer_norm.bias"].clone()
    elif edit == "foreign_prefix":
        state["vision_model.post_layernorm.bias"] = torch.zeros(2)
    return state


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", "missing keys.*final_layer_norm.bias"),
        ("unexpected", "unexpected keys.*final_layer_norm.extra"),
        ("shape", "final_layer_norm.bias: expected"),
        ("prefixed_twice", "both"),
        ("foreign_prefix", "unexpected keys.*vision_model"),
    ],
)
def test_mismatched_checkpoint_raises_before_loading(
    tmp_path: Path, edit: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _ref("plain")
    ref.save_pretrained(tmp_path)
    save_file(_edited(load_file(tmp_path / WEIGHTS), edit), tmp_path / WEIGHTS, metadata={"format": "pt"})
    assigned: list[int] = []
    original = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: assigned.append(1) or original(*a, **k))
    with pytest.raises(ValueError, match=message):
        CLIPTextModel.from_pretrained(tmp_path)
    assert not assigned
    with pytest.raises(ValueError):
        FlaxCLIPTextModel.from_pretrained(tmp_path)


def test_position_ids_are_dropped_only_where_older_writers_put_them(tmp_path: Path) -> None:
    """A projection model's checkpoint with an unprefixed ``embeddings.position_ids`` is not a known layout."""
    ref = _ref("projection")
    state = {**ref.state_dict(), "embeddings.position_ids": torch.arange(77)[None]}
    ref.save_pretrained(tmp_path)
    save_file(state, tmp_path / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected keys.*embeddings.position_ids"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embeddings.position_ids"):
        FlaxCLIPTextModelWithProjection.from_pretrained(tmp_path)


def test_wrong_model_type_and_missing_files_raise(tmp_path: Path) -> None:
    _ref("plain").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="fp16"):
        CLIPTextModel.from_pretrained(tmp_path, variant="fp16")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    for cls in (CLIPTextModel, FlaxCLIPTextModel):
        with pytest.raises(ValueError, match="model_type"):
            cls.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FlaxCLIPTextModel.from_pretrained(tmp_path)


def test_loads_from_pipeline_subfolder(tmp_path: Path) -> None:
    ref = _ref("projection")
    ref.save_pretrained(tmp_path / "pipe" / "text_encoder_2")
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path / "pipe", subfolder="text_encoder_2")
    _check_outputs(ref, ours)
