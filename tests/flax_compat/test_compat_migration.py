"""Migrating 0.39 Flax code: Flax class names in model_index.json load, and the HF Flax blog script runs
with only its import line changed (and the model id pointed at the tiny pipeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from diffusion_core.flax import compat
from diffusion_core.flax.pipelines import DiffusionPipeline, StableDiffusionPipeline
from diffusion_core.schedulers import DDIMScheduler
from tests.pipelines import sd_tiny

ROOT = Path(__file__).resolve().parents[2]

# model_index.json as diffusers 0.39's Flax save_pretrained wrote it (Flax class names)
FLAX_NAMES = {
    "_class_name": "FlaxStableDiffusionPipeline",
    "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
    "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "FlaxDDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


@pytest.fixture(scope="module")
def flax_named_folder(tmp_path_factory):
    folder = sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(FLAX_NAMES)
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "_class_name": "FlaxDDIMScheduler"})
    )
    return folder


def test_flax_class_names_load_natively_and_through_compat(flax_named_folder):
    native = DiffusionPipeline.from_pretrained(flax_named_folder)
    assert isinstance(native, StableDiffusionPipeline) and isinstance(native.scheduler, DDIMScheduler)
    pipeline, params = compat.FlaxDiffusionPipeline.from_pretrained(flax_named_folder, safety_checker=None)
    assert isinstance(pipeline, compat.FlaxStableDiffusionPipeline)
    assert isinstance(pipeline.unet, compat.FlaxUNet2DConditionModel)
    assert isinstance(pipeline.scheduler, compat.FlaxDDIMScheduler)
    scheduler, state = compat.FlaxDDIMScheduler.from_pretrained(flax_named_folder, subfolder="scheduler")
    assert scheduler.config["steps_offset"] == 1 and state.timesteps.shape == (1000,)


# The Hugging Face blog's Flax Stable Diffusion script ("Stable Diffusion in JAX / Flax"), verbatim but for
# the import line and the model id.
BLOG_SCRIPT = """
import jax
import numpy as np
from flax.jax_utils import replicate
from flax.training.common_utils import shard
from diffusion_core.flax.compat import FlaxStableDiffusionPipeline  # was: from diffusers import ...

pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(
    MODEL_ID, revision="bf16", dtype=jax.numpy.bfloat16
)
prompt = "A cinematic film still of Morgan Freeman starring as Jimi Hendrix, portrait, 40mm lens"
prompt = [prompt] * jax.device_count()
prompt_ids = pipeline.prepare_inputs(prompt)
p_params = replicate(params)
prompt_ids = shard(prompt_ids)
rng = jax.random.PRNGKey(0)
rng = jax.random.split(rng, jax.device_count())
images = pipeline(prompt_ids, p_params, rng, num_inference_steps=2, jit=True)[0]
images = images.reshape((images.shape[0] * images.shape[1],) + images.shape[-3:])
images = pipeline.numpy_to_pil(images)
assert len(images) == jax.device_count() and images[0].size == (64, 64), images
print("ok", len(images))
"""


@pytest.mark.slow
def test_hf_blog_script_runs_with_the_import_changed(tmp_path):
    folder = sd_tiny.save_sd_pipeline(tmp_path / "sd")
    script = f"MODEL_ID = {str(folder)!r}\n" + textwrap.dedent(BLOG_SCRIPT)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 8" in out.stdout


def to_flax_039_folder(folder):
    """Rewrite a pipeline folder as diffusers 0.39's Flax save_pretrained left it: Flax class names, msgpack weights
    (in 0.39's / transformers' Flax parameter trees), no PyTorch weights."""
    from flax.serialization import msgpack_serialize
    from safetensors.numpy import load_file

    from tests.flax_compat.test_flax_msgpack import flax_039_tree

    index = json.loads((folder / "model_index.json").read_text())
    index.update(FLAX_NAMES)
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, weights, flax_name, kwargs in [
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_flax_model.msgpack", {}),
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_flax_model.msgpack", {"vae": True}),
        ("text_encoder", "model.safetensors", "flax_model.msgpack", {"numbered_as_suffix": False}),
    ]:
        state = load_file(folder / name / weights)
        if name == "text_encoder":
            state = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}
        (folder / name / flax_name).write_bytes(msgpack_serialize(flax_039_tree(state, **kwargs)))
        (folder / name / weights).unlink()
    return folder


def test_flax_039_msgpack_pipeline_gives_the_safetensors_images(tmp_path):
    """The same tiny pipeline saved both ways: compat (msgpack) == native flax (safetensors); torch loads it too."""
    from diffusion_core.torch import DiffusionPipeline as TorchPipeline

    original = sd_tiny.save_sd_pipeline(tmp_path / "pt")
    flax_039 = to_flax_039_folder(sd_tiny.save_sd_pipeline(tmp_path / "flax"))
    pipeline, params = compat.FlaxStableDiffusionPipeline.from_pretrained(flax_039, safety_checker=None)
    key = jax.random.key(0)
    ids = pipeline.prepare_inputs([sd_tiny.PROMPT])
    images = pipeline(ids, params, key, num_inference_steps=2, height=32, width=32).images
    native = DiffusionPipeline.from_pretrained(original)
    native.set_progress_bar_config(disable=True)
    start = np.asarray(jax.random.normal(key, (1, 4, 16, 16)))
    ref = native(sd_tiny.PROMPT, num_inference_steps=2, height=32, width=32, latents=start, output_type="np").images
    np.testing.assert_allclose(images, ref, atol=1e-5)
    torch_pipe = TorchPipeline.from_pretrained(flax_039)
    torch_ref = TorchPipeline.from_pretrained(original)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(torch_pipe, name).state_dict(), getattr(torch_ref, name).state_dict()
        assert set(got) == set(want)
        for key_name, value in want.items():
            np.testing.assert_array_equal(got[key_name].numpy(), value.numpy())
