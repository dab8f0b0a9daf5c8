"""LoRA on the PyTorch SD pipeline against diffusers 0.42.1 + peft: PEFT and kohya files, adapter weights,
several adapters, fuse / unfuse / unload. Each parity test first checks that the LoRA changes the image by far
more than the tolerance."""

import numpy as np
import pytest

from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import lora_tiny, sd_tiny

ATOL = 2e-3
EFFECT = 50 * ATOL  # a LoRA must move the image by at least this much for the test to mean anything


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return lora_tiny.lora_folders(tmp_path_factory.mktemp("lora"))


@pytest.fixture
def ours(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["sd"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(folders):
    pipe = DiffusionPipeline.from_pretrained(folders["sd"])
    pipe.set_progress_bar_config(disable=True)
    return lora_tiny.run(pipe)


def test_peft_lora_matches_diffusers_at_weight_one_and_half(folders, ours, base):
    ref = lora_tiny.reference(folders, "a")
    ours.load_lora_weights(folders["a"], adapter_name="a")
    image = lora_tiny.run(ours)
    assert np.abs(image - base).max() > EFFECT
    np.testing.assert_allclose(image, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)
    ours.set_adapters("a", 0.5)
    ref.set_adapters("a", 0.5)
    half = lora_tiny.run(ours)
    assert np.abs(half - image).max() > EFFECT
    np.testing.assert_allclose(half, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_kohya_file_gives_the_peft_images(folders, ours, base):
    ours.load_lora_weights(folders["kohya"], adapter_name="k")
    kohya = lora_tiny.run(ours)
    assert np.abs(kohya - base).max() > EFFECT
    np.testing.assert_allclose(
        kohya, lora_tiny.run(lora_tiny.reference(folders, "a"), torch_reference=True), atol=ATOL, rtol=0
    )


def test_two_adapters_with_weights_match_diffusers(folders, ours, base):
    ref = lora_tiny.reference(folders, "a", "b", weights=[0.7, -1.5])
    ours.load_lora_weights(folders["a"], adapter_name="a")
    ours.load_lora_weights(folders["b"], adapter_name="b")
    assert ours.get_active_adapters() == ["b"]  # diffusers: the newest adapter alone
    assert ours.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a"]}
    only_b = lora_tiny.run(ours)
    ours.set_adapters(["a", "b"], [0.7, -1.5])
    both = lora_tiny.run(ours)
    assert min(np.abs(both - base).max(), np.abs(both - only_b).max()) > EFFECT
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["a", "b"]
    np.testing.assert_allclose(both, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_fused_equals_unfused_and_unfuse_restores(folders, ours, base):
    ours.load_lora_weights(folders["a"], adapter_name="a")
    ours.load_lora_weights(folders["b"], adapter_name="b")
    ours.set_adapters(["a", "b"], [0.5, 1.0])
    unfused = lora_tiny.run(ours)
    assert np.abs(unfused - base).max() > EFFECT
    ours.fuse_lora()
    np.testing.assert_allclose(lora_tiny.run(ours), unfused, atol=1e-5, rtol=0)
    ours.unfuse_lora()
    np.testing.assert_allclose(lora_tiny.run(ours), unfused, atol=1e-5, rtol=0)
    ours.fuse_lora(lora_scale=0.5)
    ref = lora_tiny.reference(folders, "a", "b", weights=[0.5, 1.0])
    ref.fuse_lora(lora_scale=0.5)
    np.testing.assert_allclose(lora_tiny.run(ours), lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_unload_restores_the_base_image_and_fuse_then_unload_keeps_it(folders, ours, base):
    keys = list(ours.unet.state_dict())
    ours.load_lora_weights(folders["a"], adapter_name="a")
    assert list(ours.unet.state_dict()) == keys  # the adapters are not part of the checkpoint
    image = lora_tiny.run(ours)
    assert np.abs(image - base).max() > EFFECT
    ours.unload_lora_weights()
    assert ours.get_active_adapters() == [] and ours.get_list_adapters() == {}
    np.testing.assert_allclose(lora_tiny.run(ours), base, atol=1e-6, rtol=0)
    ours.load_lora_weights(folders["a"], adapter_name="a")
    ours.fuse_lora()
    ours.unload_lora_weights()  # diffusers' way to bake a LoRA in
    np.testing.assert_allclose(lora_tiny.run(ours), image, atol=1e-5, rtol=0)


def test_bad_calls_raise_and_a_bad_file_loads_nothing(folders, ours):
    state = {"unet.no.such.layer.lora_A.weight": np.zeros((2, 4), np.float32)}
    with pytest.raises(ValueError, match="no layer for key"):
        ours.load_lora_weights(state)
    assert ours.get_list_adapters() == {}
    ours.load_lora_weights(folders["a"], adapter_name="a")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(folders["a"], adapter_name="a")
    with pytest.raises(ValueError, match="no adapter"):
        ours.set_adapters(["a", "zzz"])
    with pytest.raises(ValueError, match="adapter_weights"):
        ours.set_adapters(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="adapter_weights"):
        ours.set_adapters("a", float("nan"))
    with pytest.raises(ValueError, match="lora_scale"):
        ours.fuse_lora(lora_scale="1")
    with pytest.raises(ValueError, match="nothing is fused"):
        ours.unfuse_lora()
    with pytest.raises(ValueError, match="unknown argument"):
        ours.load_lora_weights(folders["b"], adapter_name="b", cache_dir="x")
    ours.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        ours.set_adapters("a")
    with pytest.raises(ValueError, match="fused already"):
        ours.fuse_lora()


def test_a_kohya_adapter_saved_here_loads_in_diffusers(folders, ours, tmp_path):
    ours.load_lora_weights(folders["kohya"], adapter_name="k")
    image = lora_tiny.run(ours)
    saved = ours.save_lora_adapter(tmp_path / "saved")
    ref = sd_tiny.load_diffusers(folders["sd"])
    ref.load_lora_weights(saved.parent, adapter_name="k")
    np.testing.assert_allclose(lora_tiny.run(ref, torch_reference=True), image, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="adapter_name"):
        ours.save_lora_adapter(tmp_path / "x", adapter_name="nope")
