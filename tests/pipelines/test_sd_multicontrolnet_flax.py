"""Flax Multi-ControlNet (``controlnet=[cn1, cn2]`` / ``MultiControlNetModel``) against diffusers 0.42.1.

The reference is a tiny diffusers ``StableDiffusionControlNetPipeline`` with two different random ControlNets (every
parameter random, the zero-initialised convolutions included), saved by diffusers as ``controlnet/`` +
``controlnet_1/``. Same numpy start latents, deterministic DDIM: pixels agree to 5e-3. Each comparison first checks
that the second ControlNet moves the image by far more than that tolerance. The per-net scales are traced, so the
comparisons with other scales reuse the compiled program.
"""

import json

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax import ControlNetModel, MultiControlNetModel
from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.flax.pipelines.stable_diffusion import StableDiffusionControlNetPipeline
from tests.pipelines import sd_tiny

ATOL = 5e-3
SIZE = 32
LATENT = (4, SIZE // 2, SIZE // 2)
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd_tiny.save_multi_controlnet_pipeline(tmp_path_factory.mktemp("multicn") / "pipe")


@pytest.fixture(scope="module")
def pair(folder):
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


def controls() -> list[np.ndarray]:
    """One (1, H, W, 3) control image per ControlNet."""
    return [sd_tiny.sample_image(seed=s) for s in (1, 2)]


def _ours(pipe, image=None, **kwargs):
    lat = sd_tiny.start_latents((1, *LATENT))
    image = controls() if image is None else image
    return pipe(prompt=sd_tiny.PROMPT, image=image, latents=lat, num_inference_steps=STEPS, output_type="np", **kwargs)


def _ref(ref, **kwargs):
    lat = torch.from_numpy(sd_tiny.start_latents((1, *LATENT)))
    image = [torch.from_numpy(im).permute(0, 3, 1, 2) for im in controls()]
    return ref(prompt=sd_tiny.PROMPT, image=image, latents=lat, num_inference_steps=STEPS, output_type="np", **kwargs)


def test_diffusers_layout_loads_as_a_multicontrolnet(pair):
    ours = pair[0]
    assert type(ours) is StableDiffusionControlNetPipeline and type(ours.controlnet) is MultiControlNetModel
    assert len(ours.controlnet.nets) == 2 and all(type(n) is ControlNetModel for n in ours.controlnet.nets)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(controlnet_conditioning_scale=[0.6, 1.4], control_guidance_start=[0.0, 0.3]),
        pytest.param(dict(guess_mode=True), marks=pytest.mark.slow),
    ],
    ids=["scales-windows", "guess-mode"],
)
def test_two_controlnets_match_diffusers(pair, kwargs):
    ours, ref = pair
    a = _ours(ours, **kwargs).images
    scales, traced = kwargs.get("controlnet_conditioning_scale", [1.0, 1.0]), ours.trace_count
    first_only = _ours(ours, **{**kwargs, "controlnet_conditioning_scale": [scales[0], 0.0]}).images
    assert ours.trace_count == traced  # the per-net scales are traced: no recompile
    assert np.abs(a - first_only).max() > 10 * ATOL  # the second ControlNet matters
    np.testing.assert_allclose(a, _ref(ref, **kwargs).images, atol=ATOL, rtol=0)


def test_list_of_controlnets_and_save_round_trip_to_diffusers(folder, pair, tmp_path):
    nets = [ControlNetModel.from_pretrained(folder, subfolder=name) for name in ("controlnet", "controlnet_1")]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.controlnet) is MultiControlNetModel and list(pipe.controlnet.nets) == nets
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    again = sd_tiny.load_diffusers(tmp_path / "saved")
    assert type(again.controlnet) is diffusers.MultiControlNetModel and len(again.controlnet.nets) == 2
    for saved, original in zip(again.controlnet.nets, pair[1].controlnet.nets, strict=True):
        weights = saved.state_dict()
        for key, value in original.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_list_of_controlnets_generates_as_the_loaded_multicontrolnet(folder, pair):
    nets = [ControlNetModel.from_pretrained(folder, subfolder=name) for name in ("controlnet", "controlnet_1")]
    pipe = StableDiffusionControlNetPipeline(**{**pair[0].components, "controlnet": nets})
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(controlnet_conditioning_scale=[1.0, 0.8], control_guidance_end=[0.7, 1.0])
    np.testing.assert_allclose(_ours(pipe, **kwargs).images, _ref(pair[1], **kwargs).images, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_multicontrolnet_model_matches_diffusers(pair):
    ours, ref = pair[0].controlnet, pair[1].controlnet
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, *LATENT, generator=gen), torch.randn(2, 77, 8, generator=gen)
    images = [torch.rand(2, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    down, mid = ours(jnp.asarray(sample), 5, jnp.asarray(context), [jnp.asarray(i) for i in images], [0.8, 1.2])
    with torch.no_grad():
        ref_down, ref_mid = ref(sample, 5, context, images, [0.8, 1.2], return_dict=False)
    for x, y in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        y = y.numpy()
        assert np.linalg.norm(np.asarray(x) - y) / np.linalg.norm(y) <= 1e-4


def test_bad_arguments_raise_before_compiling(pair):
    ours = pair[0]
    with pytest.raises(ValueError, match="image: with 2 ControlNets pass a list"):
        _ours(ours, image=controls()[0])
    with pytest.raises(ValueError, match="control_guidance_start must be smaller"):
        _ours(ours, control_guidance_start=[0.5, 0.9], control_guidance_end=[1.0, 0.9])
    with pytest.raises(ValueError, match="controlnets"):
        MultiControlNetModel([ours.unet])


def test_multicontrolnet_save_loads_in_diffusers_and_here(pair, tmp_path):
    paths = pair[0].controlnet.save_pretrained(tmp_path / "cn")
    assert {p.parent.name for p in paths} == {"cn", "cn_1"}
    again = diffusers.MultiControlNetModel.from_pretrained(str(tmp_path / "cn"))
    assert len(again.nets) == 2
    for saved, original in zip(again.nets, pair[1].controlnet.nets, strict=True):
        weights = saved.state_dict()
        for key, value in original.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    ours = MultiControlNetModel.from_pretrained(tmp_path, subfolder="cn", dtype=jnp.bfloat16)
    assert len(ours.nets) == 2 and ours.dtype == jnp.bfloat16
