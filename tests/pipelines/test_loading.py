"""Pipeline folders: model_index.json, component registry, Hub snapshots (offline cache), save/load round trips."""

import fnmatch
import json
import shutil

import huggingface_hub
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.pipelines import (
    ComponentClass,
    parse_model_index,
    pipeline_allow_patterns,
    read_model_index,
)
from diffusion_core.pipelines.components import canonical_class_name, lookup_component_class
from diffusion_core.torch.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from tests.pipelines import tiny

REPO = "tiny-org/tiny-ddpm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return tiny.save_diffusers_pipeline(tmp_path_factory.mktemp("ddpm") / "pipe", unet=tiny.MINI_UNET)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, ddpm_folder):
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, REPO, ddpm_folder, COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def test_model_index_parses_components_settings_and_absent_entries():
    index = parse_model_index(
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
        }
    )
    assert index.components["unet"].class_name == "UNet2DConditionModel"
    assert index.components["safety_checker"].is_absent
    assert index.settings == {"requires_safety_checker": False}
    assert index.to_dict()["safety_checker"] == [None, None]
    with pytest.raises(ValueError, match="_class_name"):
        parse_model_index({"unet": ["diffusers", "UNet2DModel"]})


def test_registry_resolves_names_and_rejects_unknown_ones():
    table = {"UNet2DModel": ComponentClass("diffusers", "diffusion_core.torch.models.unet_2d:UNet2DModel")}
    assert canonical_class_name("FlaxUNet2DModel") == "UNet2DModel"
    assert canonical_class_name("Flaxen") == "Flaxen"
    assert lookup_component_class(table, "FlaxDDIMScheduler", component="scheduler").kind == "scheduler"
    with pytest.raises(ValueError, match="unet: class 'Nope'"):
        lookup_component_class(table, "Nope", component="unet")
    with pytest.raises(ValueError, match="kind"):
        ComponentClass("diffusers", "a:B", "weights")


def test_allow_patterns_pick_the_variant_safetensors_and_never_pickles():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_flax_model.msgpack",
        "unet/model.onnx",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "vae/diffusion_pytorch_model.safetensors",
        "classes.json",
    ]

    def chosen(names, variant):
        patterns = pipeline_allow_patterns(names, variant)
        return sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns))

    assert chosen(["tokenizer_2"], None) == ["classes.json", "model_index.json", "tokenizer_2/spiece.model"]  # T5
    assert chosen(["unet", "text_encoder", "tokenizer"], "fp16") == [
        "classes.json",
        "model_index.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "tokenizer/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert chosen(["unet"], None) == [
        "classes.json",  # a class-conditional folder's class names and "no class" label
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


def test_generic_from_pretrained_dispatches_on_class_name(ddpm_folder):
    pipe = DiffusionPipeline.from_pretrained(ddpm_folder)
    assert type(pipe) is DDPMPipeline
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert read_model_index(ddpm_folder).class_name == "DDPMPipeline"
    direct = DDIMPipeline.from_pretrained(ddpm_folder)  # a concrete class loads any folder with its components
    assert type(direct.scheduler).__name__ == "DDIMScheduler"


def test_hub_id_loads_from_an_offline_cache_with_one_pinned_snapshot(offline_cache, monkeypatch):
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    pipe = DiffusionPipeline.from_pretrained(REPO)
    assert type(pipe) is DDPMPipeline
    assert len(calls) == 1 and calls[0]["revision"] == COMMIT
    assert "unet/diffusion_pytorch_model.safetensors" in calls[0]["allow_patterns"]
    assert not any(p.endswith((".bin", ".msgpack", ".onnx")) for p in calls[0]["allow_patterns"])
    calls.clear()
    DiffusionPipeline.from_pretrained(REPO, scheduler=schedulers.EulerDiscreteScheduler())  # no scheduler files
    assert not any(p.startswith("scheduler/") for p in calls[0]["allow_patterns"])


def test_hub_id_missing_from_the_offline_cache_raises_clearly(offline_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        DiffusionPipeline.from_pretrained("tiny-org/not-cached")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        DiffusionPipeline.from_pretrained("./missing")


def test_kwargs_override_and_bad_names_are_rejected(ddpm_folder):
    sched = schedulers.DPMSolverMultistepScheduler()
    pipe = DiffusionPipeline.from_pretrained(ddpm_folder, scheduler=sched)
    assert pipe.scheduler is sched
    with pytest.raises(ValueError, match="unknown components"):
        DiffusionPipeline.from_pretrained(ddpm_folder, vae=None)
    with pytest.raises(ValueError, match="unet"):
        DDPMPipeline(unet=None, scheduler=sched)


def test_optional_null_components_and_unknown_pipelines(ddpm_folder, tmp_path):
    data = json.loads((ddpm_folder / "model_index.json").read_text())
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**data, "_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match="NoSuchPipeline"):
        DiffusionPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({**data, "unet": [None, None]}))
    with pytest.raises(ValueError, match="unet"):
        DiffusionPipeline.from_pretrained(folder)


def test_save_pretrained_round_trip_and_dtype(ddpm_folder, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(ddpm_folder, dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64
    pipe = DiffusionPipeline.from_pretrained(ddpm_folder)
    pipe.scheduler = schedulers.from_config({**pipe.scheduler.config, "_class_name": "DDIMScheduler"})
    out = pipe.save_pretrained(tmp_path / "saved")
    pipe.save_pretrained(tmp_path / "saved")  # overwrites atomically
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folders left
    (tmp_path / "probe").mkdir()  # a folder created the ordinary way: the mode the saved one must have
    assert (out.stat().st_mode & 0o777) == ((tmp_path / "probe").stat().st_mode & 0o777)
    again = DiffusionPipeline.from_pretrained(out)
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(again.unet.state_dict()[name], value, rtol=0, atol=0)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert type(again.scheduler) is type(pipe.scheduler)
    assert public(again.scheduler.config) == public(pipe.scheduler.config)


class _WithChecker(DiffusionPipeline):
    """A pipeline with an optional component whose class this backend does not have."""

    _components = ("unet", "scheduler", "safety_checker")
    _optional_components = ("safety_checker",)


def test_optional_components_of_unavailable_classes_load_as_none(ddpm_folder, tmp_path):
    folder = tmp_path / "with_checker"
    shutil.copytree(ddpm_folder, folder)
    data = json.loads((folder / "model_index.json").read_text())
    data["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    data["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(data))
    pipe = _WithChecker.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.settings == {"requires_safety_checker": False}
    plan = _WithChecker._load_plan(read_model_index(folder), {"scheduler"})
    assert set(plan) == {"unet", "safety_checker"} and plan["safety_checker"] is None
    pipe.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert saved["safety_checker"] == [None, None] and saved["requires_safety_checker"] is False


def test_registered_but_missing_pipeline_module_raises_clearly(ddpm_folder, monkeypatch):
    from diffusion_core.torch.pipelines import TORCH_PIPELINES

    monkeypatch.setitem(TORCH_PIPELINES, "DDPMPipeline", "diffusion_core.torch.pipelines.no_such_module:DDPMPipeline")
    with pytest.raises(ValueError, match="not available"):
        DiffusionPipeline.from_pretrained(ddpm_folder)


def test_variant_round_trip_loads_here_and_in_diffusers(ddpm_folder, tmp_path):
    import diffusers

    pipe = DiffusionPipeline.from_pretrained(ddpm_folder)
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    again = DiffusionPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(again.unet.state_dict()[name], value, rtol=0, atol=0)
    ref = diffusers.DDPMPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    assert sum(p.numel() for p in ref.unet.parameters()) == sum(p.numel() for p in again.unet.parameters())
    with pytest.raises(FileNotFoundError):
        DiffusionPipeline.from_pretrained(tmp_path / "v")  # no plain weights were written
