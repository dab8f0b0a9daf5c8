"""PyTorch ``UNet2DConditionModel``: the text-conditioned UNet of Stable Diffusion 1.x/2.x and variants.

Covers SD 1.x/2.x, inpainting (9 input channels), InstructPix2Pix (8), the x4 upscaler (class
labels = noise level) and the x2 latent upscaler (K blocks, Fourier time, ``timestep_cond``).
Config fields, module names and state-dict keys are those of diffusers 0.42.1. Call:
``model(sample_nchw, timestep, encoder_hidden_states, ...) -> tensor`` (NCHW).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import unet_condition_config as ucc
from diffusion_core.models.attention import AttentionContext, attention_mask_bias
from diffusion_core.torch.models.embeddings import build_add_embedding, embed_addition
from diffusion_core.torch.models.layers import GaussianFourierProjection, TimestepEmbedding, Timesteps, get_activation
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.torch.models.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from diffusion_core.torch.models.unet_2d_condition_blocks import (
    build_down_block,
    build_mid_block,
    build_up_block,
)


def build_stem(owner: nn.Module, time: ucc.TimePlan, in_channels: int, width: int, kernel: int, hid_proj: Any) -> None:
    """Register ``conv_in``, ``time_proj``, ``time_embedding``, ``encoder_hid_proj``, ``class_embedding``.

    Shared by the UNet and the ControlNet, in diffusers' registration (state-dict) order.
    """
    owner.conv_in = nn.Conv2d(in_channels, width, kernel, padding=kernel // 2)
    if time.kind == "fourier":
        owner.time_proj = GaussianFourierProjection(time.fourier_size, log=False, flip_sin_to_cos=time.flip_sin_to_cos)
    else:
        owner.time_proj = Timesteps(time.proj_dim, time.flip_sin_to_cos, time.freq_shift)
    owner.time_embedding = TimestepEmbedding(
        time.proj_dim, time.embed_dim, time.act_fn, post_act_fn=time.post_act_fn, cond_proj_dim=time.cond_proj_dim
    )
    owner.encoder_hid_proj = None if hid_proj is None else nn.Linear(*hid_proj)
    owner.class_embedding = build_class_embedding(time)


def build_class_embedding(time: ucc.TimePlan) -> nn.Module | None:
    if time.class_embed == "embedding":
        return nn.Embedding(time.class_in_dim, time.embed_dim)
    if time.class_embed in ("timestep", "projection"):
        return TimestepEmbedding(time.class_in_dim, time.embed_dim, act_fn=time.class_act_fn)
    if time.class_embed == "simple_projection":
        return nn.Linear(time.class_in_dim, time.embed_dim)
    if time.class_embed == "identity":
        return nn.Identity()
    return None


def batch_timesteps(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast an int, float, 0-d or (B,) timestep to a (B,) tensor (Python floats stay float64, as diffusers)."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if isinstance(timestep, float) and device.type == "mps":
            dtype = torch.float32  # mps has no float64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    timestep = timestep.to(device)
    if timestep.ndim > 1 or timestep.numel() not in (1, batch):
        raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, got shape {tuple(timestep.shape)}")
    return timestep.reshape(-1).expand(batch)  # (B,)


def embed_time(
    model: nn.Module,
    time: ucc.TimePlan,
    timesteps: torch.Tensor,
    dtype: torch.dtype,
    class_labels: torch.Tensor | None,
    timestep_cond: torch.Tensor | None,
) -> torch.Tensor:
    """(B,) timesteps (+ class labels, + timestep_cond) -> (B, temb) embedding fed to every resnet."""
    emb = model.time_embedding(model.time_proj(timesteps).to(dtype), timestep_cond)
    if model.class_embedding is None:
        if class_labels is not None:
            raise ValueError("class_labels: this model has no class embedding (set num_class_embeds/class_embed_type)")
    else:
        if class_labels is None:
            raise ValueError("class_labels: required for a class-conditional model")
        if time.class_embed == "timestep":
            class_labels = model.time_proj(class_labels).to(dtype)
        class_emb = model.class_embedding(class_labels).to(dtype)
        emb = torch.cat([emb, class_emb], dim=-1) if time.class_concat else emb + class_emb
    return emb


class UNet2DConditionModel(PretrainedMixin, nn.Module):
    """Conditional 2D UNet (Rombach et al. 2022) with diffusers' config and parameter names.

    Keyword arguments are diffusers' config fields; defaults in
    ``diffusion_core.models.model_config.UNET_2D_CONDITION_DEFAULTS``. Unimplemented options raise ValueError.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = ucc.resolve_config(config, ucc.UNET_2D_CONDITION_DEFAULTS, "UNet2DConditionModel")
        plan = ucc.unet_2d_condition_plan(cfg)
        self.config = FrozenConfig(cfg)
        self.plan = plan
        self.sample_size = cfg["sample_size"]
        channels = plan.block_out_channels
        build_stem(self, plan.time, plan.in_channels, channels[0], plan.conv_in_kernel, plan.encoder_hid_proj)
        self.add_embedding = build_add_embedding(plan.addition)
        act = plan.time.embed_act_fn
        self.time_embed_act = None if act is None else get_activation(act)
        self.down_blocks = nn.ModuleList(build_down_block(b) for b in plan.down)
        self.up_blocks = nn.ModuleList(build_up_block(b) for b in plan.up)
        self.mid_block = build_mid_block(plan.mid)  # after up_blocks: diffusers' state-dict order
        self.conv_norm_out = self.conv_act = None
        if plan.norm_out_groups is not None:
            self.conv_norm_out = nn.GroupNorm(plan.norm_out_groups, channels[0], eps=plan.norm_eps)
            self.conv_act = get_activation(plan.act_fn)
        k = plan.conv_out_kernel
        self.conv_out = nn.Conv2d(channels[0], plan.out_channels, k, padding=k // 2)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet2DConditionModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**ucc.unet_2d_condition_kwargs(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the model output for ``sample`` (B, C, H, W) at ``timestep`` (scalar or (B,)).

        ``encoder_hidden_states``: (B, S, cross_attention_dim). ``attention_mask``/``encoder_attention_mask``:
        (B, tokens) keep(1)/discard(0) masks for self-/cross-attention keys, as diffusers applies them.
        ControlNet residuals: pass both ``down_block_additional_residuals`` and ``mid_block_additional_residual``.
        ``added_cond_kwargs``: the ``addition_embed_type`` inputs (SDXL: ``{"text_embeds": (B, D), "time_ids":
        (B, 6)}``).
        """
        if sample.ndim != 4:
            raise ValueError(f"sample: expected a (B, C, H, W) tensor, got shape {tuple(sample.shape)}")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "down_block_additional_residuals, mid_block_additional_residual: pass both (ControlNet) or neither"
            )
        ctx = AttentionContext(
            encoder_hidden_states=encode_context(self.encoder_hid_proj, encoder_hidden_states),
            attention_mask=attention_mask_bias(attention_mask, sample),
            encoder_attention_mask=attention_mask_bias(encoder_attention_mask, sample),
        )
        upsample_sizes = any(dim % 2**self.plan.num_upsamplers for dim in sample.shape[-2:])
        if self.plan.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = batch_timesteps(timestep, sample.shape[0], sample.device)  # (B,)
        emb = embed_time(self, self.plan.time, timesteps, sample.dtype, class_labels, timestep_cond)
        aug = embed_addition(
            self.add_embedding, self.plan.addition, encoder_hidden_states, added_cond_kwargs, emb.dtype
        )  # (B, D) or None
        emb = emb if aug is None else emb + aug
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        sample, skips = run_down(self.down_blocks, self.conv_in(sample), emb, ctx)
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals)
        sample = run_mid(self.mid_block, sample, emb, ctx)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual
        sample = self._up(sample, skips, emb, ctx, upsample_sizes)
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)

    def _up(
        self,
        sample: torch.Tensor,
        skips: tuple[torch.Tensor | None, ...],
        emb: torch.Tensor,
        ctx: AttentionContext,
        sizes: bool,
    ) -> torch.Tensor:
        """Up path; each block takes its resnets' count of skips. ``sizes``: upsample to the skip sizes."""
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if sizes and i < len(self.up_blocks) - 1 else None
            if isinstance(block, UpBlock2D):
                sample = block(sample, res, emb, size)
            else:
                sample = block(sample, res, emb, ctx, size)
        return sample


def encode_context(hid_proj: nn.Module | None, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Check the (B, S, C) encoder states and apply the optional ``encoder_hid_proj``."""
    if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
        shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
        raise ValueError(f"encoder_hidden_states: expected a (B, S, C) tensor, got {shape}")
    return encoder_hidden_states if hid_proj is None else hid_proj(encoder_hidden_states)


def run_down(
    blocks: nn.ModuleList, sample: torch.Tensor, emb: torch.Tensor, ctx: AttentionContext
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Down path from the ``conv_in`` output; returns the lowest-resolution state and every skip."""
    skips: tuple[torch.Tensor | None, ...] = (sample,)
    for block in blocks:
        sample, outputs = block(sample, emb) if isinstance(block, DownBlock2D) else block(sample, emb, ctx)
        skips += outputs
    return sample, skips


def run_mid(mid: nn.Module | None, sample: torch.Tensor, emb: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    if mid is None:
        return sample
    return mid(sample, emb) if isinstance(mid, UNetMidBlock2D) else mid(sample, emb, ctx)


def _add_residuals(
    skips: tuple[torch.Tensor | None, ...], residuals: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """Add ControlNet down residuals to the skip connections, one per skip."""
    if len(residuals) != len(skips):
        raise ValueError(
            f"down_block_additional_residuals: expected {len(skips)} tensors (one per skip), got {len(residuals)}"
        )
    return tuple(s + r for s, r in zip(skips, residuals, strict=True))
