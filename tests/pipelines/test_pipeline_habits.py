"""diffusers' pipeline habits on both backends: ``components``, ``to``/``device``/``dtype`` (torch), VAE slicing and
tiling, ``set_progress_bar_config``; and the scheduler capability (``step_options``) pipelines read.

Slicing and tiling are checked against diffusers with the same switch on, on the same tiny checkpoint.
"""

import inspect

import numpy as np
import pytest
import torch

from diffusion_core import schedulers
from diffusion_core.pipelines import stable_diffusion as sd
from diffusion_core.pipelines import unconditional as uc
from tests.pipelines import sd_tiny

SIZE = 32
STEPS = 2
BATCH = 2


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return sd_tiny.save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(params=["torch", "flax"], scope="module")
def backend(request):
    if request.param == "flax":
        pytest.importorskip("jax")
    return request.param


def _pipelines(backend):
    if backend == "torch":
        from diffusion_core.torch import pipelines
    else:
        from diffusion_core.flax import pipelines
    return pipelines


@pytest.fixture(scope="module")
def ours(backend, sd_folder):
    pipe = _pipelines(backend).DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, ref=False, **kwargs):
    lat = sd_tiny.start_latents((BATCH, 4, SIZE // 2, SIZE // 2))
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", **kwargs)
    return pipe(["a cat", "a dog"], latents=torch.from_numpy(lat) if ref else lat, **common).images


def test_components_rebuild_another_pipeline(ours, backend):
    comps = ours.components
    assert set(comps) == set(type(ours)._components)
    other = _pipelines(backend).StableDiffusionImg2ImgPipeline(**comps)
    assert all(getattr(other, name) is value for name, value in comps.items())
    ours.scheduler, old = (
        schedulers.from_config({**ours.scheduler.config, "_class_name": "EulerDiscreteScheduler"}),
        (ours.scheduler),
    )
    try:
        assert ours.components["scheduler"] is ours.scheduler  # reflects assignments
    finally:
        ours.scheduler = old


def test_progress_bar_config(ours, capsys):
    ours.set_progress_bar_config(disable=False)
    try:
        assert ours.progress_bar_disabled is False
        _run(ours)
        assert "2/2" in capsys.readouterr().err
    finally:
        ours.set_progress_bar_config(disable=True)
    _run(ours)
    assert "2/2" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="disable must be a bool"):
        ours.set_progress_bar_config(disable="yes")


@pytest.mark.parametrize("mode", ["slicing", "tiling"])
def test_vae_slicing_and_tiling_match_diffusers(ours, sd_folder, mode):
    ref = sd_tiny.load_diffusers(sd_folder)
    plain = _run(ours)
    if mode == "tiling":  # one latent tile is 8 cells, so the 16-cell latents decode as 3 x 3 overlapping tiles
        for vae in (ours.vae, ref.vae):
            vae.tile_sample_min_size, vae.tile_latent_min_size = SIZE // 2, SIZE // 4
    getattr(ours, f"enable_vae_{mode}")()
    getattr(ref.vae, f"enable_{mode}")()  # diffusers 0.42 keeps these on the VAE only
    assert getattr(ours.vae, f"use_{mode}") is True
    try:
        switched = _run(ours)
        expected = _run(ref, ref=True)
    finally:
        getattr(ours, f"disable_vae_{mode}")()
        ours.vae.tile_sample_min_size, ours.vae.tile_latent_min_size = SIZE, SIZE // 2
    assert getattr(ours.vae, f"use_{mode}") is False
    np.testing.assert_allclose(switched, expected, atol=5e-3)
    if mode == "slicing":  # same numbers, less memory
        np.testing.assert_allclose(switched, plain, atol=1e-5)
    else:  # tiles blended at the seams: a different (and diffusers-equal) image
        assert np.abs(switched - plain).max() > 5 * 5e-3
    np.testing.assert_allclose(_run(ours), plain, atol=1e-6)  # switched back off


def test_vae_switches_need_a_vae(backend, tmp_path):
    from diffusion_core.pipelines import base

    class NoVae(base.PipelineBase):
        _components = ("unet",)

    with pytest.raises(ValueError, match="enable_vae_tiling: NoVae has no vae component"):
        NoVae(unet=object()).enable_vae_tiling()


def test_torch_to_device_and_dtype(sd_folder):
    from diffusion_core.torch.pipelines import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.to(dtype=torch.float64) is pipe
    assert pipe.dtype == torch.float64 and pipe.unet.dtype == torch.float64 and pipe.vae.dtype == torch.float64
    assert pipe.text_encoder.dtype == torch.float64
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.dtype == torch.float64
    assert pipe.to(torch.device("cpu"), torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        pipe.to(dtype=torch.int64)


def _keyword_options(cls) -> set[str]:
    params = inspect.signature(cls.step).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", schedulers.SCHEDULER_NAMES)
def test_scheduler_step_options_list_what_step_takes(name):
    cls = schedulers.get_scheduler_class(name)
    assert cls.step_options == _keyword_options(cls)


def test_step_options_drive_pipeline_step_kwargs():
    ddim = schedulers.from_config({"_class_name": "DDIMScheduler"})
    euler = schedulers.from_config({"_class_name": "EulerDiscreteScheduler"})
    assert sd.step_kwargs(ddim, 0.3) == {"eta": 0.3} and sd.step_kwargs(euler, 0.3) == {}
    assert uc.ddim_step_kwargs(ddim, 0.5, True) == {"eta": 0.5, "use_clipped_model_output": True}
    assert uc.ddim_step_kwargs(euler, 0.0, None) == {}
    with pytest.raises(ValueError, match="EulerDiscreteScheduler takes neither"):
        uc.ddim_step_kwargs(euler, 0.5, None)
    assert uc.as_ddim(ddim) is ddim and type(uc.as_ddim(euler)) is type(ddim)


# --- each pipeline is defined once: the core recipe, bound by thin backend classes ------------------------------

SD_PIPELINES = [
    ("StableDiffusionPipeline", "TextToImageRecipe"),
    ("StableDiffusionImg2ImgPipeline", "Img2ImgRecipe"),
    ("StableDiffusionInpaintPipeline", "InpaintRecipe"),
    ("StableDiffusionInstructPix2PixPipeline", "Pix2PixRecipe"),
    ("StableDiffusionControlNetPipeline", "ControlNetRecipe"),
    ("StableDiffusionControlNetImg2ImgPipeline", "ControlNetImg2ImgRecipe"),
    ("StableDiffusionControlNetInpaintPipeline", "ControlNetInpaintRecipe"),
    ("StableDiffusionUpscalePipeline", "UpscaleRecipe"),
    ("StableDiffusionLatentUpscalePipeline", "LatentUpscaleRecipe"),
]
RECIPE_PARTS = ("_request", "_schedule", "_start", "_extra", "_unet_kwargs", "_model_fn", "_post_step", "_decode")


@pytest.mark.parametrize("name, recipe", SD_PIPELINES)
def test_both_backends_bind_the_same_core_recipe(name, recipe):
    from diffusion_core.pipelines import sd_recipes

    core = getattr(sd_recipes, recipe)
    classes = [getattr(_pipelines(b), name) for b in ("torch", "flax")]
    for cls in classes:
        assert issubclass(cls, core)
        backend_classes = [
            k for k in cls.__mro__ if k.__module__.startswith(("diffusion_core.torch", "diffusion_core.flax"))
        ]
        for part in (*RECIPE_PARTS, "encode_prompt", "_legacy_scheduler_options", "_components"):
            assert not any(part in vars(k) for k in backend_classes), f"{cls.__module__}.{name} redefines {part}"
    assert classes[0]._components == classes[1]._components
    for method in ("encode_prompt", "prepare_latents", "enable_vae_tiling", "set_progress_bar_config"):
        assert all(callable(getattr(cls, method, None)) for cls in classes), method
