"""Flax PriorTransformer and UnCLIPTextProjModel parity with diffusers 0.42.1, jit, and save -> diffusers load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_core.flax.models.unclip import PriorTransformer, UnCLIPTextProjModel
from tests.torch_models import test_unclip_models as ref_cases

REL_TOL = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def as_jax(inputs):
    return {k: v if v is None or isinstance(v, int | bool) else jnp.asarray(v.numpy()) for k, v in inputs.items()}


@pytest.mark.parametrize("masked", [True, False], ids=["text_mask", "no_mask"])
@pytest.mark.parametrize("name", list(ref_cases.PRIOR_CASES))
def test_prior_matches_diffusers(name, masked, tmp_path):
    config = ref_cases.PRIOR_CASES[name]
    ref = ref_cases.reference_prior(config)
    ours = PriorTransformer.from_pretrained(ref_cases.save_reference(ref, tmp_path / "prior"))
    inputs = ref_cases.prior_inputs(config, masked=masked)
    with torch.no_grad():
        expected = ref(**inputs).predicted_image_embedding.numpy()
    got = ours(**as_jax(inputs)).predicted_image_embedding
    assert got.shape == expected.shape and rel_l2(got, expected) <= REL_TOL
    with torch.no_grad():
        post = ref.post_process_latents(torch.from_numpy(expected)).numpy()
    assert rel_l2(ours.post_process_latents(jnp.asarray(expected)), post) <= REL_TOL


def test_prior_jit_equals_eager_and_saves_for_diffusers(tmp_path):
    import diffusers

    config = ref_cases.PRIOR_TINY
    ours = PriorTransformer.from_pretrained(ref_cases.save_reference(ref_cases.reference_prior(config), tmp_path / "r"))
    inputs = as_jax(ref_cases.prior_inputs(config))
    eager = ours(**inputs)[0]

    @jax.jit
    def run(x, t, proj, enc, mask):
        return ours(x, t, proj, enc, mask)[0]

    jitted = run(inputs["hidden_states"], inputs["timestep"], inputs["proj_embedding"],
                 inputs["encoder_hidden_states"], inputs["attention_mask"])  # fmt: skip
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.PriorTransformer.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        expected = back(**ref_cases.prior_inputs(config)).predicted_image_embedding.numpy()
    assert rel_l2(eager, expected) <= REL_TOL


@pytest.mark.parametrize("cfg", [True, False], ids=["guided", "unguided"])
def test_text_proj_matches_diffusers_and_round_trips(cfg, tmp_path):
    ref = ref_cases.reference_text_proj()
    ours = UnCLIPTextProjModel.from_pretrained(ref_cases.save_reference(ref, tmp_path / "text_proj"))
    inputs = ref_cases.text_proj_inputs(cfg)
    with torch.no_grad():
        expected = ref(**inputs)
    got = ours(**as_jax(inputs))
    for g_, e_ in zip(got, expected, strict=True):
        assert g_.shape == tuple(e_.shape) and rel_l2(g_, e_.numpy()) <= REL_TOL
    ours.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        back = ref_cases.RefTextProj.from_pretrained(tmp_path / "ours").eval()(**inputs)
    assert rel_l2(got[0], back[0].numpy()) <= REL_TOL and rel_l2(got[1], back[1].numpy()) <= REL_TOL
