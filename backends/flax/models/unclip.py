"""Flax NNX ``PriorTransformer`` and ``UnCLIPTextProjModel``: unCLIP's prior and decoder conditioning (Karlo).

Same config, call and outputs as the PyTorch modules (``diffusion_core.torch.models.unclip``); sizes,
checks and the attention bias come from ``diffusion_core.models.prior_config``. Attribute names are
diffusers', so the one converter fills them (bare parameters such as ``positional_embedding`` keep
their name and layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models.attention import BasicTransformerBlock
from diffusion_core.flax.models.layers import ParamKeys, TimestepEmbedding, Timesteps, layer_norm, linear
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.flax.models.unet_2d import _batch_timesteps as batch_timesteps
from diffusion_core.models import prior_config as pc
from diffusion_core.models.model_config import init_kwargs_from_config


def _zeros(shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


class PriorTransformer(PretrainedMixin, nnx.Module):
    """Causal transformer predicting a CLIP image embedding from a noisy one, the timestep and the text."""

    def __init__(self, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32, **config: Any) -> None:
        cfg = pc.prior_transformer_config(config)
        self.config = FrozenConfig(cfg)
        self.dtype = dtype
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)  # linear-time abstract builds
        dims = self.dims = pc.prior_dims(cfg)
        inner = dims.inner_dim
        self.time_proj = Timesteps(inner, True, 0)
        self.time_embedding = TimestepEmbedding(
            inner, dims.time_embed_dim, cfg["time_embed_act_fn"], out_dim=inner, rngs=rngs, dtype=dtype
        )
        self.proj_in = linear(cfg["embedding_dim"], inner, rngs, dtype)
        layer = cfg["embedding_proj_norm_type"] == "layer"
        self.embedding_proj_norm = layer_norm(dims.embedding_proj_dim, rngs, dtype) if layer else None
        self.embedding_proj = linear(dims.embedding_proj_dim, inner, rngs, dtype)
        has_text = cfg["encoder_hid_proj_type"] == "linear"
        self.encoder_hidden_states_proj = linear(cfg["embedding_dim"], inner, rngs, dtype) if has_text else None
        self.positional_embedding = _zeros((1, dims.num_positions, inner), dtype)
        self.prd_embedding = _zeros((1, 1, inner), dtype) if cfg["added_emb_type"] == "prd" else None
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    cfg["num_attention_heads"],
                    cfg["attention_head_dim"],
                    attention_bias=True,
                    activation_fn="gelu",
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(cfg["num_layers"])
            ]
        )
        self.norm_in = layer_norm(inner, rngs, dtype) if cfg["norm_in_type"] == "layer" else None
        self.norm_out = layer_norm(inner, rngs, dtype)
        self.proj_to_clip_embeddings = linear(inner, dims.clip_embed_dim, rngs, dtype)
        self.clip_mean = _zeros((1, dims.clip_embed_dim), dtype)
        self.clip_std = _zeros((1, dims.clip_embed_dim), dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> PriorTransformer:
        """Build from a diffusers ``config.json`` mapping (random weights); ``kwargs``: ``rngs``, ``dtype``."""
        return cls(**init_kwargs_from_config(config, pc.PRIOR_TRANSFORMER_DEFAULTS, "PriorTransformer"), **kwargs)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: Any,
        proj_embedding: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        return_dict: bool = True,
    ) -> pc.PriorTransformerOutput | tuple[jax.Array]:
        """Predict the (B, clip_embed_dim) image embedding from the noisy (B, D) one (see the torch module)."""
        hidden_states = jnp.asarray(hidden_states, self.dtype)
        proj_embedding = jnp.asarray(proj_embedding, self.dtype)
        timesteps = batch_timesteps(timestep, hidden_states.shape[0])  # (B,)
        time_embeddings = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))  # (B, inner)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens, lead = self._tokens(hidden_states, proj_embedding, encoder_hidden_states, time_embeddings)
        hidden_states = jnp.concatenate(tokens, axis=1)  # (B, L, inner)
        front, back = pc.positional_padding(
            self.dims.num_positions, hidden_states.shape[1], lead, self.prd_embedding is not None
        )
        hidden_states = hidden_states + jnp.pad(self.positional_embedding[...], ((0, 0), (front, back), (0, 0)))
        bias = None
        if attention_mask is not None:
            bias = pc.prior_attention_bias(
                jnp.asarray(attention_mask),
                hidden_states,
                self.dims.num_positions,
                self.config["additional_embeddings"],
            )  # (B, L, L)
        if self.norm_in is not None:
            hidden_states = self.norm_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, attention_mask=bias)
        hidden_states = self.norm_out(hidden_states)
        hidden_states = hidden_states[:, -1] if self.prd_embedding is not None else hidden_states[:, lead:]
        out = self.proj_to_clip_embeddings(hidden_states)
        return pc.PriorTransformerOutput(out) if return_dict else (out,)

    def _tokens(self, hidden_states, proj_embedding, encoder_hidden_states, time_embeddings):
        """([text tokens,] text embedding, timestep, noisy image embedding[, prd]; each (B, n, inner)), and the
        number of tokens before the image embedding."""
        if self.encoder_hidden_states_proj is not None and encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: this prior projects text tokens (encoder_hid_proj_type='linear')")
        tokens = []
        if encoder_hidden_states is not None:
            encoder_hidden_states = jnp.asarray(encoder_hidden_states, self.dtype)
            if self.encoder_hidden_states_proj is not None:
                encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)
            tokens.append(encoder_hidden_states)  # (B, T, inner)
        proj = self.embedding_proj(proj_embedding)
        hidden_states = self.proj_in(hidden_states)
        tokens.append(proj[:, None] if proj.ndim == 2 else proj)
        tokens.append(time_embeddings[:, None])
        lead = sum(t.shape[1] for t in tokens)
        tokens.append(hidden_states[:, None] if hidden_states.ndim == 2 else hidden_states)
        if self.prd_embedding is not None:
            prd = self.prd_embedding[...]
            tokens.append(jnp.broadcast_to(prd, (hidden_states.shape[0], 1, prd.shape[-1])))
        return tokens, lead

    def post_process_latents(self, prior_latents: jax.Array) -> jax.Array:
        """Undo the prior's embedding normalisation: ``latents * clip_std + clip_mean``."""
        return prior_latents * self.clip_std[...] + self.clip_mean[...]


class UnCLIPTextProjModel(PretrainedMixin, nnx.Module):
    """Image embedding -> decoder conditioning: extra context tokens and an additive time embedding."""

    def __init__(self, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32, **config: Any) -> None:
        cfg = pc.unclip_text_proj_config(config)
        self.config = FrozenConfig(cfg)
        self.dtype = dtype
        rngs = ParamKeys(nnx.Rngs(0) if rngs is None else rngs)
        clip, time, cross = cfg["clip_embeddings_dim"], cfg["time_embed_dim"], cfg["cross_attention_dim"]
        self.learned_classifier_free_guidance_embeddings = _zeros((clip,), dtype)
        self.embedding_proj = linear(clip, time, rngs, dtype)
        self.clip_image_embeddings_project_to_time_embeddings = linear(clip, time, rngs, dtype)
        self.clip_extra_context_tokens_proj = linear(clip, cfg["clip_extra_context_tokens"] * cross, rngs, dtype)
        self.encoder_hidden_states_proj = linear(clip, cross, rngs, dtype)
        self.text_encoder_hidden_states_norm = layer_norm(cross, rngs, dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> UnCLIPTextProjModel:
        """Build from a diffusers ``config.json`` mapping (random weights); ``kwargs``: ``rngs``, ``dtype``."""
        return cls(**init_kwargs_from_config(config, pc.UNCLIP_TEXT_PROJ_DEFAULTS, "UnCLIPTextProjModel"), **kwargs)

    def __call__(
        self,
        *,
        image_embeddings: jax.Array,
        prompt_embeds: jax.Array,
        text_encoder_hidden_states: jax.Array,
        do_classifier_free_guidance: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """(decoder context (B, extra + T, cross), additive time embedding (B, time_embed_dim)), as the torch module."""
        image_embeddings = jnp.asarray(image_embeddings, self.dtype)
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings[...]
            image_embeddings = jnp.concatenate(
                [jnp.broadcast_to(uncond, image_embeddings.shape), image_embeddings], axis=0
            )
        pc.check_text_proj_batch(image_embeddings.shape[0], prompt_embeds.shape[0])
        batch = prompt_embeds.shape[0]
        prompt_embeds = jnp.asarray(prompt_embeds, self.dtype)
        time_embeddings = self.embedding_proj(prompt_embeds) + self.clip_image_embeddings_project_to_time_embeddings(
            image_embeddings
        )  # (B, time_embed_dim)
        extra = self.clip_extra_context_tokens_proj(image_embeddings)  # (B, extra * cross)
        extra = jnp.swapaxes(
            extra.reshape(batch, -1, self.config["clip_extra_context_tokens"]), 1, 2
        )  # (B, extra, cross)
        text = jnp.asarray(text_encoder_hidden_states, self.dtype)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text))
        return jnp.concatenate([extra, text], axis=1), time_embeddings
