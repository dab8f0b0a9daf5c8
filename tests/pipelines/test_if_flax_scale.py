"""Scale-out of the Flax DeepFloyd IF pipelines on 8 forced CPU devices (tests/conftest.py).

``parallel="pmap"`` and ``mesh=`` give the images of one device (image b draws from ``fold_in(key, b)``, whatever
device runs it); 5 images on 8 devices are padded and trimmed. Stage I from given T5 embeddings, and stage II
inpainting from ``original_image`` (every recipe hook: the noise-augmented upscaled image, its class labels, the
strength start and the mask blend).
"""

import jax
import numpy as np
import pytest

from diffusion_core.flax.pipelines.pipeline_utils import DiffusionPipeline
from tests.pipelines import if_tiny

BATCH = 5  # 5 images on 8 devices: padded to 8, trimmed back


def _load(tmp_path_factory, kind):
    pipe = DiffusionPipeline.from_pretrained(if_tiny.save_if_pipeline(tmp_path_factory.mktemp("if_scale") / kind, kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _paths_agree(pipe, **call):
    """Single device vs pmap vs mesh on the same key: the same images (<= 1e-5), each image its own draw."""
    assert jax.local_device_count() == 8
    single = pipe(key=jax.random.key(7), output_type="np", **call).images
    assert single.shape[0] == BATCH and np.isfinite(single).all()
    assert not np.allclose(single[0], single[1])
    pmapped = pipe(key=jax.random.key(7), output_type="np", parallel="pmap", **call).images
    sharded = pipe(key=jax.random.key(7), output_type="np", mesh=jax.make_mesh((8,), ("data",)), **call).images
    np.testing.assert_allclose(pmapped, single, atol=1e-5, err_msg="pmap")
    np.testing.assert_allclose(sharded, single, atol=1e-5, err_msg="mesh")
    return single


def test_stage_i_paths_agree(tmp_path_factory):
    pipe = _load(tmp_path_factory, if_tiny.STAGE_I)
    pos, neg = if_tiny.text_embeds(1)
    _paths_agree(
        pipe, prompt_embeds=pos, negative_prompt_embeds=neg, num_images_per_prompt=BATCH, num_inference_steps=2,
        height=16, width=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="parallel"):
        pipe(prompt_embeds=pos, negative_prompt_embeds=neg, key=jax.random.key(0), parallel="vmap")


@pytest.mark.slow  # three stage II programs (~1 min on a shared CPU)
def test_inpainting_super_resolution_paths_agree(tmp_path_factory):
    pipe = _load(tmp_path_factory, if_tiny.INPAINT_SR)
    pos, neg = if_tiny.text_embeds(BATCH)
    _paths_agree(
        pipe, prompt_embeds=pos, negative_prompt_embeds=neg, image=if_tiny.low_res_images(BATCH).transpose(0, 2, 3, 1),
        original_image=if_tiny.low_res_images(BATCH, size=32, seed=6).transpose(0, 2, 3, 1), strength=0.8,
        mask_image=if_tiny.mask(32), noise_level=100, num_inference_steps=3,
    )  # fmt: skip
