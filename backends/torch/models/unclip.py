"""PyTorch ``PriorTransformer`` and ``UnCLIPTextProjModel``: unCLIP's prior and decoder conditioning (Karlo).

Config fields, module names and state-dict keys are diffusers 0.42.1's; sizes, checks and the
attention bias come from ``diffusion_core.models.prior_config``, shared with the Flax modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import prior_config as pc
from diffusion_core.models.model_config import init_kwargs_from_config
from diffusion_core.torch.models.attention import BasicTransformerBlock
from diffusion_core.torch.models.layers import TimestepEmbedding, Timesteps
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.torch.models.unet_2d_condition import batch_timesteps


class PriorTransformer(PretrainedMixin, nn.Module):
    """Causal transformer predicting a CLIP image embedding from a noisy one, the timestep and the text.

    Keyword arguments: diffusers' config fields (``prior_config.PRIOR_TRANSFORMER_DEFAULTS``).
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = pc.prior_transformer_config(config)
        self.config = FrozenConfig(cfg)
        dims = self.dims = pc.prior_dims(cfg)
        inner = dims.inner_dim
        self.time_proj = Timesteps(inner, True, 0)
        self.time_embedding = TimestepEmbedding(inner, dims.time_embed_dim, cfg["time_embed_act_fn"], out_dim=inner)
        self.proj_in = nn.Linear(cfg["embedding_dim"], inner)
        layer = cfg["embedding_proj_norm_type"] == "layer"
        self.embedding_proj_norm = nn.LayerNorm(dims.embedding_proj_dim) if layer else None
        self.embedding_proj = nn.Linear(dims.embedding_proj_dim, inner)
        has_text = cfg["encoder_hid_proj_type"] == "linear"
        self.encoder_hidden_states_proj = nn.Linear(cfg["embedding_dim"], inner) if has_text else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, dims.num_positions, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if cfg["added_emb_type"] == "prd" else None
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                cfg["num_attention_heads"],
                cfg["attention_head_dim"],
                dropout=cfg["dropout"],
                attention_bias=True,
                activation_fn="gelu",
            )
            for _ in range(cfg["num_layers"])
        )
        self.norm_in = nn.LayerNorm(inner) if cfg["norm_in_type"] == "layer" else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, dims.clip_embed_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, dims.clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, dims.clip_embed_dim))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PriorTransformer:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**init_kwargs_from_config(config, pc.PRIOR_TRANSFORMER_DEFAULTS, "PriorTransformer"))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> pc.PriorTransformerOutput | tuple[torch.Tensor]:
        """Predict the (B, clip_embed_dim) image embedding from the noisy (B, D) one.

        ``proj_embedding``: (B, embedding_proj_dim) text embedding; ``encoder_hidden_states``: (B, T, D)
        text tokens; ``attention_mask``: (B, T) 0/1 flags of the text tokens (None: no mask at all, as
        diffusers, which then also drops the causal mask).
        """
        batch = hidden_states.shape[0]
        dtype = self.proj_in.weight.dtype
        timesteps = batch_timesteps(timestep, batch, hidden_states.device)
        time_embeddings = self.time_embedding(self.time_proj(timesteps).to(dtype))  # (B, inner)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens, lead = self._tokens(hidden_states, proj_embedding, encoder_hidden_states, time_embeddings)
        hidden_states = torch.cat(tokens, dim=1)  # (B, L, inner)
        front, back = pc.positional_padding(
            self.dims.num_positions, hidden_states.shape[1], lead, self.prd_embedding is not None
        )
        hidden_states = hidden_states + F.pad(self.positional_embedding.to(hidden_states.dtype), (0, 0, front, back))
        bias = None
        if attention_mask is not None:
            bias = pc.prior_attention_bias(
                attention_mask, hidden_states, self.dims.num_positions, self.config["additional_embeddings"]
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
            tokens.append(self.prd_embedding.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1))
        return tokens, lead

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Undo the prior's embedding normalisation: ``latents * clip_std + clip_mean``."""
        return prior_latents * self.clip_std + self.clip_mean


class UnCLIPTextProjModel(PretrainedMixin, nn.Module):
    """Image embedding -> decoder conditioning: extra context tokens and an additive time embedding.

    Keyword arguments: diffusers' config fields (``prior_config.UNCLIP_TEXT_PROJ_DEFAULTS``).
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = pc.unclip_text_proj_config(config)
        self.config = FrozenConfig(cfg)
        clip, time, cross = cfg["clip_embeddings_dim"], cfg["time_embed_dim"], cfg["cross_attention_dim"]
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip))
        self.embedding_proj = nn.Linear(clip, time)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip, time)
        self.clip_extra_context_tokens_proj = nn.Linear(clip, cfg["clip_extra_context_tokens"] * cross)
        self.encoder_hidden_states_proj = nn.Linear(clip, cross)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnCLIPTextProjModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**init_kwargs_from_config(config, pc.UNCLIP_TEXT_PROJ_DEFAULTS, "UnCLIPTextProjModel"))

    def forward(
        self,
        *,
        image_embeddings: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder context (B, extra + T, cross), additive time embedding (B, time_embed_dim)).

        With guidance, the learned unconditional embedding is put before the image embeddings, so
        ``prompt_embeds`` / ``text_encoder_hidden_states`` hold [unconditional, conditional].
        """
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings.to(image_embeddings.dtype)
            image_embeddings = torch.cat([uncond.expand(image_embeddings.shape[0], -1), image_embeddings])
        pc.check_text_proj_batch(image_embeddings.shape[0], prompt_embeds.shape[0])
        batch = prompt_embeds.shape[0]
        time_embeddings = self.embedding_proj(prompt_embeds) + self.clip_image_embeddings_project_to_time_embeddings(
            image_embeddings
        )  # (B, time_embed_dim)
        extra = self.clip_extra_context_tokens_proj(image_embeddings)  # (B, extra * cross)
        extra = extra.reshape(batch, -1, self.config["clip_extra_context_tokens"]).permute(0, 2, 1)  # (B, extra, cross)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return torch.cat([extra, text], dim=1), time_embeddings
