"""The core LoRA key mapping (``diffusion_core.weights.lora``): PEFT and kohya names, SD 1.x and SDXL prefixes,
alphas from keys and from diffusers' metadata, and the errors that refuse a partial load. Numpy only."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_core.weights.lora import LORA_WEIGHTS_NAME, LoraLayer, load_lora, parse_lora, read_lora_file, save_lora

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5's CLIPTextModel (no text_model level)
TE2_Q = "text_model.encoder.layers.1.mlp.fc1"  # CLIPTextModelWithProjection keeps text_model
TARGETS = {
    "unet": {Q: (8, 6), OUT: (6, 8), CONV: (4, 3, 3, 3)},
    "text_encoder": {TE_Q: (8, 8)},
    "text_encoder_2": {TE2_Q: (16, 8)},
}


def _pair(rank: int, weight: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    down = rng.standard_normal((rank, weight[1], *weight[2:])).astype(np.float32)
    up = rng.standard_normal((weight[0], rank) + ((1, 1) if len(weight) == 4 else ())).astype(np.float32)
    return down, up


def _peft(prefix: str, path: str, weight, rank=2, seed=0) -> dict:
    down, up = _pair(rank, weight, seed)
    return {f"{prefix}.{path}.lora_A.weight": down, f"{prefix}.{path}.lora_B.weight": up}


def _kohya(prefix: str, path: str, weight, rank=2, seed=0, alpha=None) -> dict:
    down, up = _pair(rank, weight, seed)
    name = prefix + path.replace(".", "_")
    out = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def test_peft_keys_map_to_module_paths_with_scale_one_by_default():
    tensors = {
        **_peft("unet", Q, (8, 6)),
        **_peft("unet", CONV, (4, 3, 3, 3), rank=3),
        **_peft("text_encoder", TE_Q, (8, 8)),
    }
    layers = parse_lora(tensors, TARGETS)
    assert sorted(layers) == ["text_encoder", "unet"]
    assert sorted(layers["unet"]) == sorted([Q, CONV]) and list(layers["text_encoder"]) == [TE_Q]
    q = layers["unet"][Q]
    assert q.rank == 2 and q.scale == 1.0
    np.testing.assert_array_equal(q.down, tensors[f"unet.{Q}.lora_A.weight"])
    assert layers["unet"][CONV].rank == 3


def test_kohya_keys_equal_peft_keys_and_alpha_sets_the_scale():
    peft = parse_lora({**_peft("unet", OUT, (6, 8), rank=4), **_peft("text_encoder", TE_Q, (8, 8))}, TARGETS)
    kohya = {**_kohya("lora_unet_", OUT, (6, 8), rank=4, alpha=2.0)}
    kohya.update(_kohya("lora_te_", "text_model." + TE_Q, (8, 8)))  # published files keep text_model
    layers = parse_lora(kohya, TARGETS)
    assert layers["unet"][OUT].scale == 0.5 and layers["text_encoder"][TE_Q].scale == 1.0
    for component, path in (("unet", OUT), ("text_encoder", TE_Q)):
        np.testing.assert_array_equal(layers[component][path].up, peft[component][path].up)


def test_sdxl_prefixes_land_on_both_text_encoders():
    tensors = {**_kohya("lora_te1_", TE_Q, (8, 8)), **_kohya("lora_te2_", TE2_Q, (16, 8), seed=1)}
    assert {c: list(p) for c, p in parse_lora(tensors, TARGETS).items()} == {
        "text_encoder": [TE_Q],
        "text_encoder_2": [TE2_Q],
    }
    peft = {**_peft("text_encoder_2", "encoder.layers.1.mlp.fc1", (16, 8))}  # transformers 5 names, no text_model
    assert list(parse_lora(peft, TARGETS)["text_encoder_2"]) == [TE2_Q]
    with_level = {**_peft("text_encoder", "text_model." + TE_Q, (8, 8))}  # published diffusers files
    assert list(parse_lora(with_level, TARGETS)["text_encoder"]) == [TE_Q]


def test_metadata_alpha_pattern_and_rslora():
    tensors = {**_peft("unet", Q, (8, 6), rank=4), **_peft("unet", OUT, (6, 8), rank=4)}
    meta = {"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_out.0": 2}, "unet.r": 4}
    layers = parse_lora(tensors, TARGETS, meta)
    assert layers["unet"][Q].scale == 2.0 and layers["unet"][OUT].scale == 0.5
    layers = parse_lora(tensors, TARGETS, {"unet.lora_alpha": 8, "unet.use_rslora": True})
    assert layers["unet"][Q].scale == 4.0  # alpha / sqrt(rank)
    tensors[f"unet.{Q}.alpha"] = np.asarray(1.0, np.float32)  # a key wins over the metadata
    assert parse_lora(tensors, TARGETS, meta)["unet"][Q].scale == 0.25


def test_unknown_keys_are_listed_and_nothing_loads():
    tensors = {**_peft("unet", Q, (8, 6)), "unet.not.a.layer.lora_A.weight": np.zeros((2, 6), np.float32)}
    tensors["lora_unet_down_blocks_9_x.lora_down.weight"] = np.zeros((2, 6), np.float32)
    tensors["unet.foo.lora_magnitude_vector"] = np.zeros(3, np.float32)
    tensors.update(_peft("text_encoder_3", TE_Q, (8, 8)))
    with pytest.raises(ValueError, match="no layer for key") as err:
        parse_lora(tensors, TARGETS)
    for key in ("unet.not.a.layer", "lora_unet_down_blocks_9_x", "lora_magnitude_vector", "text_encoder_3."):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="text_encoder_2"):  # an SDXL file on an SD 1.x pipeline
        parse_lora(
            _kohya("lora_te2_", TE2_Q, (16, 8)), {"unet": TARGETS["unet"], "text_encoder": TARGETS["text_encoder"]}
        )


def test_half_pairs_and_shape_mismatches_are_errors():
    half = {f"unet.{Q}.lora_A.weight": np.zeros((2, 6), np.float32)}
    with pytest.raises(ValueError, match="needs both down and up"):
        parse_lora(half, TARGETS)
    wrong = _peft("unet", Q, (8, 7))
    with pytest.raises(ValueError, match="do not fit weight"):
        parse_lora(wrong, TARGETS)
    with pytest.raises(ValueError, match="DoRA"):
        parse_lora(_peft("unet", Q, (8, 6)), TARGETS, {"unet.use_dora": True})
    with pytest.raises(ValueError, match="no tensors"):
        parse_lora({}, TARGETS)


def test_delta_weight_linear_and_conv():
    down, up = _pair(3, (8, 6))
    np.testing.assert_allclose(LoraLayer(down, up, 0.5).delta_weight(), 0.5 * up @ down, rtol=1e-6)
    down, up = _pair(2, (4, 3, 3, 3))
    delta = LoraLayer(down, up, 2.0).delta_weight()
    assert delta.shape == (4, 3, 3, 3)
    np.testing.assert_allclose(delta, 2.0 * np.einsum("or,rihw->oihw", up[:, :, 0, 0], down), rtol=1e-5)


def test_read_file_folder_and_metadata(tmp_path):
    tensors = _peft("unet", Q, (8, 6), rank=4)
    save_file(
        tensors, tmp_path / LORA_WEIGHTS_NAME, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2})}
    )
    save_file(_kohya("lora_unet_", Q, (8, 6)), tmp_path / "kohya.safetensors")
    read, meta = read_lora_file(tmp_path)  # the folder: diffusers' default name
    assert meta == {"unet.lora_alpha": 2} and sorted(read) == sorted(tensors)
    assert load_lora(tmp_path, TARGETS)["unet"][Q].scale == 0.5
    assert load_lora(tmp_path, TARGETS, weight_name="kohya.safetensors")["unet"][Q].scale == 1.0
    assert load_lora(tmp_path / "kohya.safetensors", TARGETS)["unet"][Q].rank == 2
    assert load_lora(tensors, TARGETS)["unet"][Q].scale == 1.0  # a state dict
    with pytest.raises(FileNotFoundError, match="weight_name"):
        load_lora(tmp_path, TARGETS, weight_name="missing.safetensors")
    with pytest.raises(ValueError, match="weight_name"):
        load_lora(tmp_path, TARGETS, weight_name="lora.bin")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_lora(tmp_path / "nope", TARGETS)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path_or_dict"):
        load_lora(3, TARGETS)


def test_hub_repo_id_fetches_weight_name(tmp_path, monkeypatch):
    import huggingface_hub

    save_file(_peft("unet", Q, (8, 6)), tmp_path / "my_lora.safetensors")
    asked = []

    def fake_download(repo_id, filename, local_files_only=False, **kwargs):
        asked.append((repo_id, filename, local_files_only, kwargs))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("diffusion_core.weights.hub._hub_host_unresolvable", lambda: None)
    layers = load_lora("org/some-lora", TARGETS, weight_name="my_lora.safetensors", revision="main")
    assert list(layers["unet"]) == [Q]
    assert asked == [("org/some-lora", "my_lora.safetensors", False, {"revision": "main"})]


def test_half_precision_factors_give_float32_deltas():
    tensors = {k: v.astype(np.float16) for k, v in _peft("unet", CONV, (4, 3, 3, 3), rank=2).items()}
    layer = parse_lora(tensors, TARGETS)["unet"][CONV]
    assert layer.down.dtype == np.float16 and layer.delta_weight().dtype == np.float32


def test_save_then_read_gives_the_same_layers(tmp_path):
    tensors = {**_kohya("lora_unet_", Q, (8, 6), rank=4, alpha=2.0), **_kohya("lora_unet_", CONV, (4, 3, 3, 3))}
    tensors.update(_kohya("lora_unet_", OUT, (6, 8), rank=4, alpha=2.0, seed=3))
    tensors.update(_kohya("lora_te2_", TE2_Q, (16, 8), rank=3, alpha=6.0))
    layers = parse_lora(tensors, TARGETS)
    path = save_lora(tmp_path / "out", layers)
    assert path.name == LORA_WEIGHTS_NAME and [p.name for p in path.parent.iterdir()] == [LORA_WEIGHTS_NAME]
    read, meta = read_lora_file(path)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.0 and meta["unet.rank_pattern"] == {CONV: 2}
    assert f"text_encoder_2.{TE2_Q}.lora_A.weight" in read  # diffusers' prefixes and names
    again = load_lora(path, TARGETS)
    for component, by_path in layers.items():
        for p, layer in by_path.items():
            assert again[component][p].scale == pytest.approx(layer.scale)
            np.testing.assert_array_equal(again[component][p].up, layer.up)
    with pytest.raises(ValueError, match="weight_name"):
        save_lora(tmp_path, layers, weight_name="../x.safetensors")
