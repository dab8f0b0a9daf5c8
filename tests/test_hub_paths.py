"""``path_or_repo_id``: paths that do not exist fail at once without asking the Hub; a name that could be
either says both readings in one message; no network means the Hub cache only, at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from diffusion_core.torch import DiffusionPipeline
from diffusion_core.torch.models import UNet2DModel
from diffusion_core.weights import hub

LOADERS = {"pipeline": DiffusionPipeline.from_pretrained, "model": UNet2DModel.from_pretrained}


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks huggingface_hub for a download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("path", ["./my_model_dir", "../up/model", "/abs/model", "~/model", "a\\b", "a/b/c", Path("m")])
def test_path_that_does_not_exist_fails_at_once(no_hub, tmp_path, monkeypatch, loader, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder .*the Hub was not asked"):
        LOADERS[loader](path)


def test_a_file_is_not_a_folder(no_hub, tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file; expected a model or pipeline folder"):
        DiffusionPipeline.from_pretrained(tmp_path / "weights.safetensors")


def test_looks_like_path_rules():
    for text in ("./x", "/x", "~/x", "a\\b", "a/b/c", "../x"):
        assert hub.looks_like_path(text), text
    for text in ("gpt2", "org/name", "my_model_dir", "CompVis/stable-diffusion-v1-4"):
        assert not hub.looks_like_path(text), text


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_ambiguous_name_without_network_fails_fast_naming_both_readings(tmp_path, monkeypatch, loader):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_hub_host_unresolvable", lambda: "huggingface.co cannot be resolved: no network")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        LOADERS[loader]("my_model_dir")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f"is not a local folder (no {str(tmp_path / 'my_model_dir')!r})" in message
    assert "as a Hub repo id" in message and "no network" in message and "not in the local Hub cache" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one message, no chained tracebacks


def test_offline_mode_names_itself(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, and it is not in the local Hub cache"):
        hub.hub_fetch("org/name", None, False, lambda local_only: (_ for _ in ()).throw(OSError("offline")))


def test_no_network_still_reads_the_hub_cache(monkeypatch, tmp_path):
    """Without network the download runs in cache-only mode (so cached snapshots still load)."""
    seen = []
    monkeypatch.setattr(hub, "_hub_host_unresolvable", lambda: "no network")
    assert (
        hub.hub_fetch("org/name", None, False, lambda local_only: seen.append(local_only) or str(tmp_path)) == tmp_path
    )
    assert seen == [True]


def test_hub_host_check_is_skipped_behind_a_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert hub._hub_host_unresolvable() is None
