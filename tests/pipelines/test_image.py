"""Image utilities against diffusers' VaeImageProcessor: range maps, numpy <-> PIL, resizing, output types."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from diffusion_core.pipelines import image


def _images(b=2, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).uniform(size=(b, h, w, c)).astype(np.float32)


def test_numpy_pil_round_trip_matches_diffusers():
    arr = _images()
    ours, ref = image.numpy_to_pil(arr), VaeImageProcessor.numpy_to_pil(arr)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(image.pil_to_numpy(ours), VaeImageProcessor.pil_to_numpy(ref), atol=0)
    gray = image.numpy_to_pil(_images(c=1))
    assert gray[0].mode == "L" and image.pil_to_numpy(gray).shape == (2, 6, 5, 1)
    with pytest.raises(ValueError, match="images"):
        image.numpy_to_pil(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="images"):
        image.pil_to_numpy([])


@pytest.mark.parametrize("as_torch", [False, True])
def test_normalize_and_denormalize_match_diffusers(as_torch):
    x = torch.from_numpy(_images() * 3 - 1) if as_torch else _images() * 3 - 1
    np.testing.assert_allclose(np.asarray(image.normalize(x)), np.asarray(VaeImageProcessor.normalize(x)), atol=1e-6)
    ref = VaeImageProcessor.denormalize(torch.as_tensor(x)).clamp(0, 1)
    np.testing.assert_allclose(np.asarray(image.denormalize(x)), ref.numpy(), atol=1e-6)


def test_layouts_output_types_and_resizing():
    nchw = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(image.nhwc_to_nchw(image.nchw_to_nhwc(nchw)), nchw)
    out = image.images_to_output(nchw, "np")
    np.testing.assert_allclose(out, np.clip(nchw / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    pil = image.images_to_output(nchw, "pil")
    assert len(pil) == 2 and pil[0].size == (5, 4)
    with pytest.raises(ValueError, match="output_type"):
        image.images_to_output(nchw, "latent")
    src = Image.fromarray((_images(1, 16, 12)[0] * 255).astype(np.uint8))
    resized = image.resize_pil(src, 8, 6, "bicubic")[0]
    ref = src.resize((6, 8), resample=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(ref))
    with pytest.raises(ValueError, match="resample"):
        image.resize_pil(src, 8, 6, "area")
    assert image.round_to_multiple(517, 389, 8) == (512, 384)


def test_image_grid_fills_rows_and_leaves_the_rest_black():
    from diffusion_core.pipelines.image import image_grid

    images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)  # (5, 2, 3, 1)
    grid = image_grid(images)  # 3 columns, 2 rows
    assert grid.shape == (4, 9, 1)
    np.testing.assert_array_equal(grid[::2, ::3, 0], [[1, 2, 3], [4, 5, 0]])
    assert image_grid(images, cols=5).shape == (2, 15, 1)
    with pytest.raises(ValueError, match="cols"):
        image_grid(images, cols=0)


def test_save_png_is_atomic_and_round_trips(tmp_path):
    from PIL import Image

    from diffusion_core.pipelines.image import save_png

    image = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    path = save_png(image, tmp_path / "sub" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]
    with pytest.raises(ValueError, match="uint8"):
        save_png(image.astype(np.float32), tmp_path / "y.png")
