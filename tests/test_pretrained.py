"""from_pretrained/save_pretrained against diffusers: both directions, both backends, strict errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_core.flax.models import AutoencoderKL as FlaxVAE
from diffusion_core.flax.models import UNet2DModel as FlaxUNet
from diffusion_core.torch.models import AutoencoderKL, UNet2DModel
from tests.config_files import assert_same_config_file

UNET: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}
VAE: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 2,
    "layers_per_block": 1,
    "sample_size": 16,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _ref_unet() -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**UNET).eval()


def _rel_l2(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])


def _same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(torch.as_tensor(np.asarray(a[k])), torch.as_tensor(np.asarray(b[k]))), k


@pytest.mark.parametrize(
    "save_kwargs", [{}, {"max_shard_size": "2KB"}, {"variant": "fp16"}], ids=["single", "sharded", "fp16"]
)
def test_diffusers_checkpoint_loads_in_both_backends(tmp_path: Path, save_kwargs: dict[str, Any]) -> None:
    ref = _ref_unet()
    if "variant" in save_kwargs:
        ref = ref.half().float()  # weights exactly representable in the fp16 file
        copy.deepcopy(ref).half().save_pretrained(tmp_path, safe_serialization=True, **save_kwargs)
    else:
        ref.save_pretrained(tmp_path, safe_serialization=True, **save_kwargs)
    if "max_shard_size" in save_kwargs:
        assert (tmp_path / f"{WEIGHTS}.index.json").is_file()
    variant = save_kwargs.get("variant")
    x, t = _inputs()
    with torch.no_grad():
        want = ref(x, t).sample.numpy()
        ours = UNet2DModel.from_pretrained(tmp_path, variant=variant)
        assert not ours.training
        assert all(p.requires_grad and not p.is_meta for p in ours.parameters())
        assert not any(b.is_meta for b in ours.buffers())
        assert _rel_l2(ours(x, t).numpy(), want) < 1e-5
    flax_model = FlaxUNet.from_pretrained(tmp_path, variant=variant)
    assert _rel_l2(flax_model(jnp.asarray(x.numpy()), jnp.asarray(t.numpy())), want) < 1e-4


def test_vae_loads_from_pipeline_subfolder_and_saves_for_diffusers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE).eval()
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    ours = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.decode(ref.encode(x).latent_dist.mode()).sample
        assert _rel_l2(ours.decode(ours.encode(x).mode()), want) < 1e-5
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    _same_weights(again.state_dict(), ref.state_dict())
    assert_same_config_file(tmp_path / "ours" / "config.json", tmp_path / "pipe" / "vae" / "config.json")


def test_ours_saved_loads_in_diffusers_with_same_config_bytes(tmp_path: Path) -> None:
    ref = _ref_unet()
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DModel.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="2KB")
    assert_same_config_file(tmp_path / "ours" / "config.json", tmp_path / "ref" / "config.json")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours")
    _same_weights(again.state_dict(), ref.state_dict())
    ref_config = diffusers.UNet2DModel.from_pretrained(tmp_path / "ref").config
    assert {k: v for k, v in again.config.items() if k != "_name_or_path"} == {
        k: v for k, v in ref_config.items() if k != "_name_or_path"
    }


def test_round_trip_torch_flax_diffusers_is_bit_identical(tmp_path: Path) -> None:
    ref = _ref_unet()
    ours = UNet2DModel.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.save_pretrained(tmp_path / "torch")
    FlaxUNet.from_pretrained(tmp_path / "torch").save_pretrained(tmp_path / "flax", max_shard_size="3KB")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "flax")
    _same_weights(back.state_dict(), ref.state_dict())
    assert_same_config_file(tmp_path / "flax" / "config.json", tmp_path / "torch" / "config.json")


def test_dtype_casts_weights(tmp_path: Path) -> None:
    ref = _ref_unet()
    ref.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    want = ref.state_dict()["conv_in.weight"].to(torch.bfloat16)
    assert torch.equal(ours.state_dict()["conv_in.weight"], want)
    flax_model = FlaxUNet.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert flax_model.conv_in.kernel.dtype == jnp.bfloat16
    assert flax_model.conv_in.bias[...].dtype == jnp.bfloat16


def _edit_checkpoint(folder: Path, edit: str) -> None:
    path = folder / WEIGHTS
    state = load_file(path)
    if edit == "missing":
        del state["conv_in.bias"]
    elif edit == "extra":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["conv_in.bias"] = torch.zeros(5)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit", ["missing", "extra", "shape"])
def test_mismatched_checkpoint_raises_before_building(
    tmp_path: Path, edit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ref_unet().save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, edit)
    assigned: list[Any] = []
    original = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: assigned.append(1) or original(*a, **k))
    word = {"missing": "missing keys", "extra": "unexpected keys", "shape": "conv_in.bias"}[edit]
    with pytest.raises(ValueError, match=word):
        UNet2DModel.from_pretrained(tmp_path)
    assert not assigned
    with pytest.raises(ValueError):
        FlaxUNet.from_pretrained(tmp_path)


def test_missing_files_raise(tmp_path: Path) -> None:
    _ref_unet().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="fp16"):
        UNet2DModel.from_pretrained(tmp_path, variant="fp16")
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError):
        UNet2DModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        FlaxUNet.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        UNet2DModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="subfolder"):
        UNet2DModel.from_pretrained(tmp_path, subfolder="../x")


def test_hub_id_offline_without_cache_raises_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="as a Hub repo id .*could not be fetched: HF_HUB_OFFLINE is set"):
        UNet2DModel.from_pretrained("someone/no-such-model", subfolder="unet")
    with pytest.raises(FileNotFoundError, match="as a Hub repo id .*could not be fetched: HF_HUB_OFFLINE is set"):
        FlaxUNet.from_pretrained("someone/no-such-model", local_files_only=True)


def test_allow_patterns_restrict_to_variant() -> None:
    from diffusion_core.weights.hub import hub_allow_patterns

    assert hub_allow_patterns("unet", WEIGHTS, "fp16") == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-[0-9]*-of-[0-9]*.safetensors",
    ]
    assert hub_allow_patterns(None, WEIGHTS, None)[:2] == ["config.json", WEIGHTS]


def test_flax_vae_loads_diffusers_checkpoint_and_saves_it_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = FlaxVAE.from_pretrained(tmp_path / "ref")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.decode(ref.encode(x).latent_dist.mode()).sample
    got = np.asarray(ours.decode(ours.encode(jnp.asarray(x.numpy())).mode()))
    assert _rel_l2(torch.from_numpy(got), want) < 1e-4
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    _same_weights(again.state_dict(), ref.state_dict())


def test_pickle_checkpoint_needs_allow_pickle_in_both_backends(tmp_path: Path) -> None:
    ref = _ref_unet()
    ref.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file() and not (tmp_path / WEIGHTS).exists()
    for cls in (UNet2DModel, FlaxUNet):
        with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
            cls.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match="allow_pickle"):
            cls.from_pretrained(tmp_path, allow_pickle=1)
    x, t = _inputs()
    with torch.no_grad():
        want = ref(x, t).sample.numpy()
        assert _rel_l2(UNet2DModel.from_pretrained(tmp_path, allow_pickle=True)(x, t).numpy(), want) < 1e-5
    flax_model = FlaxUNet.from_pretrained(tmp_path, allow_pickle=True)
    assert _rel_l2(flax_model(jnp.asarray(x.numpy()), jnp.asarray(t.numpy())), want) < 1e-4


def test_safetensors_preferred_over_pickle_and_pickle_patterns_opt_in(tmp_path: Path) -> None:
    from diffusion_core.weights.hub import hub_allow_patterns

    ref = _ref_unet()
    ref.save_pretrained(tmp_path, safe_serialization=False)
    state = dict(torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True))
    state["conv_in.bias"] = state["conv_in.bias"] + 1.0  # the safetensors file differs: it must win
    save_file(state, tmp_path / WEIGHTS, metadata={"format": "pt"})
    ours = UNet2DModel.from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(ours.state_dict()["conv_in.bias"], state["conv_in.bias"])
    assert hub_allow_patterns("unet", WEIGHTS, None, allow_pickle=True)[4:] == [
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.bin.index.json",
        "unet/diffusion_pytorch_model-[0-9]*-of-[0-9]*.bin",
    ]
    assert hub_allow_patterns(None, "model.safetensors", "fp16", allow_pickle=True)[4:6] == [
        "pytorch_model.fp16.bin",
        "pytorch_model.bin.index.fp16.json",
    ]
