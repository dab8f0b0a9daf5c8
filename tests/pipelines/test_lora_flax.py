"""LoRA on the Flax SD pipeline against diffusers 0.42.1 + peft: PEFT and kohya files, adapter weights that do not
recompile the denoising program, several adapters, fuse / unfuse / unload. Each parity test first checks that the
LoRA changes the image by far more than the tolerance."""

import numpy as np
import pytest
from flax import nnx

from diffusion_core.flax.lora import LoraLinear, LoraWeight
from diffusion_core.flax.models.loading import WEIGHTS
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import lora_tiny

ATOL = 5e-3
EFFECT = 20 * ATOL  # a LoRA must move the image by at least this much for the test to mean anything


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return lora_tiny.lora_folders(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def pipe(folders):
    """One pipeline for the module (its compiled programs are reused); each test unloads what it loaded."""
    ours = DiffusionPipeline.from_pretrained(folders["sd"])
    ours.set_progress_bar_config(disable=True)
    return ours


@pytest.fixture
def ours(pipe, folders):
    """The pipeline with adapters "a" and "b" loaded (one LoRA layout, so one compiled program for the module)."""
    pipe.load_lora_weights(folders["a"], adapter_name="a")
    pipe.load_lora_weights(folders["b"], adapter_name="b")
    yield pipe
    pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def base(pipe):
    return lora_tiny.run(pipe)


def test_peft_lora_matches_diffusers_and_new_weights_do_not_recompile(folders, ours, base):
    ref = lora_tiny.reference(folders, "a")
    ours.set_adapters("a")
    image = lora_tiny.run(ours)
    assert np.abs(image - base).max() > EFFECT
    np.testing.assert_allclose(image, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)
    traced = ours.trace_count
    ours.set_adapters("a", 0.5)
    ref.set_adapters("a", 0.5)
    half = lora_tiny.run(ours)
    assert ours.trace_count == traced and ours.last_compile_seconds == 0.0  # weights are program inputs
    assert np.abs(half - image).max() > EFFECT
    np.testing.assert_allclose(half, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_kohya_file_gives_the_peft_images(folders, pipe, base):
    pipe.load_lora_weights(folders["kohya"], adapter_name="k")
    pipe.load_lora_weights(folders["b"], adapter_name="b")  # the layout of the other tests: no new program
    pipe.set_adapters("k")
    kohya = lora_tiny.run(pipe)
    pipe.unload_lora_weights()
    assert np.abs(kohya - base).max() > EFFECT
    np.testing.assert_allclose(
        kohya, lora_tiny.run(lora_tiny.reference(folders, "a"), torch_reference=True), atol=ATOL, rtol=0
    )


def test_two_adapters_with_weights_match_diffusers_without_recompiling(folders, ours, base):
    ref = lora_tiny.reference(folders, "a", "b", weights=[0.7, -1.5])
    only_b = lora_tiny.run(ours)
    traced = ours.trace_count
    ours.set_adapters(["a", "b"], [0.7, -1.5])
    both = lora_tiny.run(ours)
    assert ours.trace_count == traced
    assert min(np.abs(both - base).max(), np.abs(both - only_b).max()) > EFFECT
    np.testing.assert_allclose(both, lora_tiny.run(ref, torch_reference=True), atol=ATOL, rtol=0)


def test_fused_equals_unfused_unfuse_restores_unload_gives_base(ours, base):
    ours.set_adapters(["a", "b"], [0.5, 1.0])
    unfused = lora_tiny.run(ours)
    assert np.abs(unfused - base).max() > EFFECT
    traced = ours.trace_count
    ours.fuse_lora()
    np.testing.assert_allclose(lora_tiny.run(ours), unfused, atol=1e-5, rtol=0)
    ours.unfuse_lora()
    np.testing.assert_allclose(lora_tiny.run(ours), unfused, atol=1e-5, rtol=0)
    assert ours.trace_count == traced  # fusing changes weight values, not the program
    ours.unload_lora_weights()
    np.testing.assert_allclose(lora_tiny.run(ours), base, atol=1e-5, rtol=0)  # fuse + unfuse: float rounding
    assert ours.trace_count == traced  # back to the base layout: the base program is reused


def test_adapters_are_not_checkpoint_parameters(folders, pipe):
    weights = nnx.to_flat_state(nnx.state(pipe.unet, WEIGHTS))
    pipe.load_lora_weights(folders["a"], adapter_name="a")
    ours = pipe
    layer = ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(layer) is LoraLinear and isinstance(layer.lora_down, LoraWeight)
    assert [p for p, _ in nnx.to_flat_state(nnx.state(ours.unet, WEIGHTS))] == [p for p, _ in weights]
    targets = ours._lora_targets("unet")  # a second load sees the same layers, not the adapters' own convs
    assert "down_blocks.0.resnets.0.conv1" in targets and not [p for p in targets if "lora" in p]
    ours.unload_lora_weights()
    assert type(layer) is nnx.Linear and "lora_down" not in vars(layer)
