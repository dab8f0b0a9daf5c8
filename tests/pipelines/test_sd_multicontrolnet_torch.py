"""PyTorch Multi-ControlNet (``controlnet=[cn1, cn2]`` / ``MultiControlNetModel``) against diffusers 0.42.1.

The reference is a tiny diffusers ``StableDiffusionControlNetPipeline`` with two different random ControlNets (every
parameter random, the zero-initialised convolutions included), saved by diffusers as ``controlnet/`` +
``controlnet_1/``. Same start latents, deterministic DDIM: pixels agree to 2e-3. Each comparison first checks that
the second ControlNet moves the image by far more than that tolerance.
"""

import json

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch

from diffusion_core.models import multicontrolnet as mcn
from diffusion_core.pipelines import sd_control
from diffusion_core.torch import ControlNetModel, MultiControlNetModel
from diffusion_core.torch.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_core.torch.pipelines.stable_diffusion import StableDiffusionControlNetPipeline
from tests.pipelines import sd_tiny, tiny

ATOL = 2e-3
SIZE = 32
LATENT = (4, SIZE // 2, SIZE // 2)
REPO = "tiny-org/tiny-multi-controlnet"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd_tiny.save_multi_controlnet_pipeline(tmp_path_factory.mktemp("multicn") / "pipe")


@pytest.fixture(scope="module")
def pair(folder):
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, sd_tiny.load_diffusers(folder)


def controls(prompts: int = 1) -> list[np.ndarray]:
    """One (prompts, H, W, 3) control image per ControlNet."""
    return [np.concatenate([sd_tiny.sample_image(seed=s + 10 * p) for p in range(prompts)]) for s in (1, 2)]


def _nchw(images):
    return [torch.from_numpy(im).permute(0, 3, 1, 2) for im in images]


def _run(pair, image=None, prompts=1, **kwargs):
    ours, ref = pair
    per_prompt = kwargs.get("num_images_per_prompt", 1)
    lat = sd_tiny.start_latents((prompts * per_prompt, *LATENT))
    image = controls(prompts) if image is None else image
    prompt = sd_tiny.PROMPT if prompts == 1 else [sd_tiny.PROMPT] * prompts
    common = dict(prompt=prompt, num_inference_steps=3, output_type="np", **kwargs)
    a = ours(image=image, latents=lat, **common).images
    b = ref(image=_nchw(image), latents=torch.from_numpy(lat), **common).images
    return a, b


def test_diffusers_layout_loads_as_a_multicontrolnet(folder, pair):
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("controlnet")) == ["controlnet", "controlnet_1"]
    assert json.loads((folder / "model_index.json").read_text())["controlnet"] == ["diffusers", "MultiControlNetModel"]
    ours = pair[0]
    assert type(ours) is StableDiffusionControlNetPipeline and type(ours.controlnet) is MultiControlNetModel
    assert len(ours.controlnet.nets) == 2 and all(type(n) is ControlNetModel for n in ours.controlnet.nets)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(controlnet_conditioning_scale=[0.6, 1.4]),
        dict(control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0]),
        dict(control_guidance_start=0.3, control_guidance_end=[0.7, 1.0]),
        dict(guess_mode=True, controlnet_conditioning_scale=[1.0, 0.5]),
        dict(guidance_scale=1.0),
        dict(num_images_per_prompt=2, negative_prompt=sd_tiny.NEGATIVE),
    ],
    ids=["cfg", "scales", "windows", "broadcast-start", "guess-mode", "no-cfg", "two-images"],
)
def test_two_controlnets_match_diffusers(pair, kwargs):
    a, b = _run(pair, **kwargs)
    scales = kwargs.get("controlnet_conditioning_scale", [1.0, 1.0])
    first_only, _ = _run(pair, **{**kwargs, "controlnet_conditioning_scale": [scales[0], 0.0]})
    assert np.abs(a - first_only).max() > 10 * ATOL  # the second ControlNet matters
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_per_prompt_image_lists_match_diffusers(pair):
    """diffusers' nested form: one list per prompt, holding one control image per ControlNet."""
    per_net = controls(prompts=2)
    nested = [[per_net[k][p : p + 1] for k in range(2)] for p in range(2)]
    a = _run(pair, image=per_net, prompts=2)[0]
    ours, ref = pair
    lat = sd_tiny.start_latents((2, *LATENT))
    common = dict(prompt=[sd_tiny.PROMPT] * 2, num_inference_steps=3, output_type="np")
    b = ours(image=nested, latents=lat, **common).images
    c = ref(image=[_nchw(i) for i in nested], latents=torch.from_numpy(lat), **common).images
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    np.testing.assert_allclose(b, c, atol=ATOL, rtol=0)


def test_from_pretrained_with_a_list_of_controlnets(folder, pair):
    nets = [ControlNetModel.from_pretrained(folder, subfolder=name) for name in ("controlnet", "controlnet_1")]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.controlnet) is MultiControlNetModel and list(pipe.controlnet.nets) == nets
    a = _run((pipe, pair[1]))
    np.testing.assert_allclose(a[0], _run(pair)[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a[0], a[1], atol=ATOL, rtol=0)
    swapped = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": nets[::-1]})
    swapped.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run((swapped, pair[1]), image=controls()[::-1])[0], a[0], atol=1e-5, rtol=0)


def test_saved_pipeline_keeps_diffusers_layout_and_loads_in_diffusers(pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    assert (tmp_path / "saved" / "controlnet_1" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "saved" / "controlnet_2").exists()
    again = sd_tiny.load_diffusers(tmp_path / "saved")
    assert type(again.controlnet) is diffusers.MultiControlNetModel and len(again.controlnet.nets) == 2
    a, b = _run((pair[0], again))
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_hub_id_loads_every_controlnet_folder_from_the_cache(folder, pair, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, REPO, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    pipe = DiffusionPipeline.from_pretrained(REPO)
    assert len(pipe.controlnet.nets) == 2
    patterns = calls[0]["allow_patterns"]
    assert "controlnet_[0-9]*/config.json" in patterns and "controlnet/config.json" in patterns
    weights = pipe.controlnet.nets[1].state_dict()
    for key, value in pair[0].controlnet.nets[1].state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


def test_multicontrolnet_model_matches_diffusers(pair):
    ours, ref = pair[0].controlnet, pair[1].controlnet
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, *LATENT, generator=gen), torch.randn(2, 77, 8, generator=gen)
    images = [torch.rand(2, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    with torch.no_grad():
        down, mid = ours(sample, 5, context, images, [0.8, 1.2])
        ref_down, ref_mid = ref(sample, 5, context, images, [0.8, 1.2], return_dict=False)
    for x, y in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        assert (torch.linalg.norm(x - y) / torch.linalg.norm(y)).item() <= 1e-5


def test_bad_per_controlnet_arguments_raise(pair):
    ours = pair[0]
    call = dict(prompt=sd_tiny.PROMPT, num_inference_steps=2, output_type="np")
    image = controls()
    cases = [
        (dict(image=image[0]), "image: with 2 ControlNets pass a list"),
        (dict(image=image[:1]), "got 1 entries"),
        (dict(image=[[image[0]], [image[1]]]), "every per-prompt list needs 2 images"),
        (dict(image=[image[0], sd_tiny.sample_image(16, 16)]), "must share one size"),
        (dict(image=image, controlnet_conditioning_scale=[1.0, 1.0, 1.0]), "controlnet_conditioning_scale must be"),
        (dict(image=image, control_guidance_start=[0.1]), "a list of 2 of them"),
        (dict(image=image, control_guidance_start=[0.1, 0.6], control_guidance_end=0.5), "ControlNet 1: 0.6 >= 0.5"),
        (dict(image=image, control_guidance_end=[1.0, 1.5]), r"control_guidance_end must be in \[0, 1\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(**call, **kwargs)
    for bad in ([], [ours.unet], ours.controlnet.nets[0]):
        with pytest.raises(ValueError, match="controlnets"):
            MultiControlNetModel(bad)
    with pytest.raises(FileNotFoundError, match="path_or_repo_id: MultiControlNetModel loads from a local folder"):
        MultiControlNetModel.from_pretrained("no/such-folder-here")


def test_keeps_and_settings_broadcast_per_net():
    settings = sd_control.control_settings(2, 0.5, [0.0, 0.5], 1.0)
    assert settings == sd_control.ControlSettings((0.5, 0.5), (0.0, 0.5), (1.0, 1.0))
    np.testing.assert_array_equal(
        sd_control.controlnet_keeps(4, settings.starts, settings.ends), [[1, 0], [1, 0], [1, 1], [1, 1]]
    )
    np.testing.assert_array_equal(
        sd_control.controlnet_keeps(5, settings.starts, settings.ends, 1), [[0, 0], [1, 0], [1, 0], [1, 1], [1, 1]]
    )
    assert [p.name for p in (mcn.sibling_folder("a/controlnet", i) for i in range(3))] == [
        "controlnet",
        "controlnet_1",
        "controlnet_2",
    ]


def test_multicontrolnet_save_loads_in_diffusers_and_here(pair, tmp_path):
    paths = pair[0].controlnet.save_pretrained(tmp_path / "cn")
    assert {p.parent.name for p in paths} == {"cn", "cn_1"}
    again = diffusers.MultiControlNetModel.from_pretrained(str(tmp_path / "cn"))
    assert len(again.nets) == 2
    for saved, original in zip(again.nets, pair[1].controlnet.nets, strict=True):
        weights = saved.state_dict()
        for key, value in original.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    ours = MultiControlNetModel.from_pretrained(tmp_path, subfolder="cn", dtype=torch.float16)
    assert len(ours.nets) == 2 and ours.dtype == torch.float16
