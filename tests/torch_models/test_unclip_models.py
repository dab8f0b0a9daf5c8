"""PyTorch PriorTransformer and UnCLIPTextProjModel parity with diffusers 0.42.1, and their save/load round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as UnCLIPTextProjModelRef

from diffusion_core.torch.models.unclip import PriorTransformer, UnCLIPTextProjModel
from tests.pipelines import tiny

RefPrior = diffusers.PriorTransformer
RefTextProj = UnCLIPTextProjModelRef
REL_TOL = 1e-5

# diffusers' unCLIP pipeline fast-test prior (tests/pipelines/unclip/test_unclip.py), with a short text
PRIOR_TINY: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "embedding_dim": 32,
    "num_layers": 1,
    "num_embeddings": 7,
}
PRIOR_CASES: dict[str, dict[str, Any]] = {
    "unclip_tiny": PRIOR_TINY,
    "norms_and_own_widths": {
        **PRIOR_TINY,
        "num_layers": 2,
        "norm_in_type": "layer",
        "embedding_proj_norm_type": "layer",
        "time_embed_dim": 40,
        "embedding_proj_dim": 16,
        "clip_embed_dim": 20,
        "time_embed_act_fn": "gelu",
    },
    # Shap-E style: (B, T, D) hidden states, no text tokens, no prd token, a padded positional table
    "tokens_no_text_no_prd": {
        **PRIOR_TINY,
        "num_embeddings": 5,
        "additional_embeddings": 0,
        "encoder_hid_proj_type": None,
        "added_emb_type": None,
    },
}
TEXT_PROJ_TINY: dict[str, Any] = {
    "clip_extra_context_tokens": 2,
    "clip_embeddings_dim": 32,
    "time_embed_dim": 24,
    "cross_attention_dim": 16,
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (diffusers initialises the positional table, prd token and clip stats to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_prior(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    ref = RefPrior(**config).eval()
    randomise(ref, seed)
    return ref


def prior_inputs(config: dict[str, Any], batch: int = 2, seed: int = 1, masked: bool = True) -> dict[str, Any]:
    """The prior's call arguments; the text mask hides the last tokens of the second prompt."""
    g = torch.Generator().manual_seed(seed)
    dim, tokens = config["embedding_dim"], config["num_embeddings"]
    proj_dim = config.get("embedding_proj_dim") or dim
    if config.get("encoder_hid_proj_type", "linear") is None:  # image tokens, no text
        return {
            "hidden_states": torch.randn(batch, tokens, dim, generator=g),
            "timestep": 17,
            "proj_embedding": torch.randn(batch, proj_dim, generator=g),
        }
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, tokens - 3 :] = False
    return {
        "hidden_states": torch.randn(batch, dim, generator=g),
        "timestep": torch.tensor([3, 250]),
        "proj_embedding": torch.randn(batch, proj_dim, generator=g),
        "encoder_hidden_states": torch.randn(batch, tokens, dim, generator=g),
        "attention_mask": mask if masked else None,
    }


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def save_reference(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("masked", [True, False], ids=["text_mask", "no_mask"])
@pytest.mark.parametrize("name", list(PRIOR_CASES))
def test_prior_matches_diffusers(name, masked, tmp_path):
    config = PRIOR_CASES[name]
    ref = reference_prior(config)
    ours = PriorTransformer.from_pretrained(save_reference(ref, tmp_path / "prior"))
    inputs = prior_inputs(config, masked=masked)
    with torch.no_grad():
        expected = ref(**inputs).predicted_image_embedding
        got = ours(**inputs)
    assert expected.abs().mean() > 1e-2  # not a degenerate reference
    assert got.predicted_image_embedding.shape == expected.shape
    assert rel_l2(got.predicted_image_embedding, expected) <= REL_TOL
    assert rel_l2(ours(**inputs, return_dict=False)[0], expected) <= REL_TOL
    latents = expected.detach()
    assert rel_l2(ours.post_process_latents(latents), ref.post_process_latents(latents)) <= REL_TOL


def test_prior_mask_changes_the_output(tmp_path):
    """The text mask and the causal mask act: the masked and unmasked calls differ."""
    ours = PriorTransformer.from_pretrained(save_reference(reference_prior(PRIOR_TINY), tmp_path / "p"))
    with torch.no_grad():
        masked = ours(**prior_inputs(PRIOR_TINY)).predicted_image_embedding
        unmasked = ours(**prior_inputs(PRIOR_TINY, masked=False)).predicted_image_embedding
    assert rel_l2(masked, unmasked) > 1e-3


@pytest.mark.parametrize("name", list(PRIOR_CASES))
def test_prior_save_loads_in_diffusers(name, tmp_path):
    config = PRIOR_CASES[name]
    ours = PriorTransformer.from_pretrained(save_reference(reference_prior(config), tmp_path / "ref"))
    ours.save_pretrained(tmp_path / "ours")
    back = RefPrior.from_pretrained(tmp_path / "ours").eval()
    inputs = prior_inputs(config)
    with torch.no_grad():
        assert rel_l2(ours(**inputs)[0], back(**inputs).predicted_image_embedding) <= REL_TOL
    assert dict(back.config)["num_embeddings"] == config["num_embeddings"]


def test_prior_loads_from_a_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    source = save_reference(reference_prior(PRIOR_TINY), tmp_path / "src" / "prior")
    cache = tmp_path / "hub"
    tiny.hub_cache(cache, "tiny-org/unclip-prior", source.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours = PriorTransformer.from_pretrained("tiny-org/unclip-prior", subfolder="prior")
    np.testing.assert_array_equal(
        ours.clip_std.detach().numpy(), PriorTransformer.from_pretrained(source).clip_std.detach().numpy()
    )


def reference_text_proj(seed: int = 0) -> torch.nn.Module:
    ref = RefTextProj(**TEXT_PROJ_TINY).eval()
    randomise(ref, seed)
    return ref


def text_proj_inputs(cfg: bool, batch: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    rows = 2 * batch if cfg else batch
    return {
        "image_embeddings": torch.randn(batch, 32, generator=g),
        "prompt_embeds": torch.randn(rows, 32, generator=g),
        "text_encoder_hidden_states": torch.randn(rows, 5, 32, generator=g),
        "do_classifier_free_guidance": cfg,
    }


@pytest.mark.parametrize("cfg", [True, False], ids=["guided", "unguided"])
def test_text_proj_matches_diffusers_and_round_trips(cfg, tmp_path):
    ref = reference_text_proj()
    ours = UnCLIPTextProjModel.from_pretrained(save_reference(ref, tmp_path / "text_proj"))
    inputs = text_proj_inputs(cfg)
    with torch.no_grad():
        expected = ref(**inputs)
        got = ours(**inputs)
        ours.save_pretrained(tmp_path / "ours")
        back = RefTextProj.from_pretrained(tmp_path / "ours").eval()(**inputs)
    for g_, e_, b_ in zip(got, expected, back, strict=True):
        assert g_.shape == e_.shape
        assert rel_l2(g_, e_) <= REL_TOL and rel_l2(g_, b_) <= REL_TOL


@pytest.mark.parametrize(
    "config,match",
    [
        ({"norm_in_type": "group"}, "norm_in_type"),
        ({"added_emb_type": "mean"}, "added_emb_type"),
        ({"time_embed_act_fn": "tanh"}, "time_embed_act_fn"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 0.1}, "dropout"),
        ({"flavour": 1}, "flavour"),
    ],
)
def test_prior_rejects_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        PriorTransformer(**{**PRIOR_TINY, **config})


def test_bad_calls_raise_value_errors():
    prior = PriorTransformer(**PRIOR_TINY)
    inputs = prior_inputs(PRIOR_TINY)
    with pytest.raises(ValueError, match="attention_mask"):
        prior(**{**inputs, "attention_mask": inputs["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        prior(**{**inputs, "encoder_hidden_states": None})
    with pytest.raises(ValueError, match="time_embed_dim"):
        UnCLIPTextProjModel(clip_embeddings_dim=8, cross_attention_dim=8)
    with pytest.raises(ValueError, match="image_embeddings"):
        UnCLIPTextProjModel(**TEXT_PROJ_TINY)(**{**text_proj_inputs(True), "do_classifier_free_guidance": False})
