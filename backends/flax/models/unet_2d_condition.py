"""Flax NNX ``UNet2DConditionModel``: the text-conditional UNet of Stable Diffusion 1.x/2.x and its variants.

Covers SD 1.x/2.x, inpainting (9 channels), InstructPix2Pix (8), the x4 upscaler (class labels) and
the x2 latent upscaler (K blocks, fourier time embedding, ``timestep_cond``), and takes ControlNet
residuals. The config is checked and resolved into per-block plans once, framework-neutrally, by
``diffusion_core.models.unet_condition_config``; attribute names are diffusers', so
``load_torch_state_dict`` fills the model through the one converter. NCHW at the boundary, NHWC inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.configuration import FrozenConfig
from diffusion_core.flax.models.embeddings import build_add_embedding, embed_addition
from diffusion_core.flax.models.layers import (
    GaussianFourierProjection,
    ParamKeys,
    TimestepEmbedding,
    Timesteps,
    conv,
    get_activation,
    group_norm,
    linear,
)
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.flax.models.unet_2d import _batch_timesteps as batch_timesteps
from diffusion_core.flax.models.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from diffusion_core.flax.models.unet_2d_condition_blocks import build_down_block, build_mid_block, build_up_block
from diffusion_core.models import unet_condition_config as ucc
from diffusion_core.models.attention import AttentionContext, attention_mask_bias


def to_nhwc(x: Any, name: str, dtype: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) array, got shape {tuple(x.shape)}")
    return jnp.transpose(x, (0, 2, 3, 1)).astype(dtype)  # (B, H, W, C)


class ConditionEmbeddings:
    """Builds and applies ``time_proj``, ``time_embedding``, ``class_embedding`` and ``encoder_hid_proj``.

    Shared by UNet2DConditionModel and ControlNetModel (same attribute names in both).
    """

    config: FrozenConfig
    dtype: Any

    def _setup(self, cfg: dict[str, Any], plan: Any, rngs: nnx.Rngs | None, dtype: Any) -> ParamKeys:
        """Keep the resolved config and plan; the init keys (linear-time abstract construction, see ParamKeys)."""
        self.config = FrozenConfig(cfg)
        self.dtype = dtype
        self.plan = plan
        return ParamKeys(nnx.Rngs(0) if rngs is None else rngs)

    def _build_embeddings(
        self, time: ucc.TimePlan, hid_proj: tuple[int, int] | None, rngs: nnx.Rngs, dtype: Any
    ) -> None:
        self.time_plan = time
        if time.kind == "fourier":
            self.time_proj = GaussianFourierProjection(
                time.fourier_size, log=False, flip_sin_to_cos=time.flip_sin_to_cos, rngs=rngs, dtype=dtype
            )
        else:
            self.time_proj = Timesteps(time.proj_dim, time.flip_sin_to_cos, time.freq_shift)
        self.time_embedding = TimestepEmbedding(
            time.proj_dim, time.embed_dim, time.act_fn, time.cond_proj_dim, time.post_act_fn, rngs=rngs, dtype=dtype
        )
        self.class_embedding = self._class_embedding(time, rngs, dtype)
        self.time_embed_act = get_activation(time.embed_act_fn) if time.embed_act_fn else None
        self.encoder_hid_proj = linear(*hid_proj, rngs, dtype) if hid_proj else None

    @staticmethod
    def _class_embedding(time: ucc.TimePlan, rngs: nnx.Rngs, dtype: Any) -> nnx.Module | None:
        kind, dim = time.class_embed, time.embed_dim
        if kind == "embedding":
            return nnx.Embed(time.class_in_dim, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        if kind == "timestep":
            return TimestepEmbedding(time.proj_dim, dim, time.class_act_fn, rngs=rngs, dtype=dtype)
        if kind == "projection":
            return TimestepEmbedding(time.class_in_dim, dim, time.class_act_fn, rngs=rngs, dtype=dtype)
        if kind == "simple_projection":
            return linear(time.class_in_dim, dim, rngs, dtype)
        return None  # None or "identity"

    def _embed(self, timesteps: jax.Array, class_labels: Any, timestep_cond: Any, addition: Any = None) -> jax.Array:
        """(B, embed_dim) time embedding [+ or | class embedding] [+ addition], as every resnet receives it."""
        kind = self.time_plan.class_embed
        if kind is None and class_labels is not None:
            raise ValueError("class_labels: this model has no class embedding (set num_class_embeds)")
        if kind is not None and class_labels is None:
            raise ValueError(f"class_labels: required for a model with class_embed_type {kind!r}")
        if timestep_cond is not None:
            timestep_cond = jnp.asarray(timestep_cond).astype(self.dtype)
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype), timestep_cond)  # (B, D)
        if kind is not None:
            labels = jnp.asarray(class_labels)
            if kind == "timestep":
                labels = self.time_proj(labels.reshape(-1)).astype(self.dtype)
            elif kind != "embedding":
                labels = labels.astype(self.dtype)
            class_emb = labels if kind == "identity" else self.class_embedding(labels)
            class_emb = class_emb.astype(self.dtype)
            emb = jnp.concatenate([emb, class_emb], -1) if self.time_plan.class_concat else emb + class_emb
        if addition is not None:
            emb = emb + addition
        return emb if self.time_embed_act is None else self.time_embed_act(emb)

    def _context(self, encoder_hidden_states: Any, project: bool = True) -> jax.Array:
        """The (B, S, D) text context, through ``encoder_hid_proj`` if the model has one and ``project``."""
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if context.ndim != 3:
            raise ValueError(f"encoder_hidden_states: expected a (B, S, D) array, got shape {tuple(context.shape)}")
        return context if self.encoder_hid_proj is None or not project else self.encoder_hid_proj(context)


class UNet2DConditionModel(ConditionEmbeddings, PretrainedMixin, nnx.Module):
    """Conditional 2D UNet (Rombach et al. 2022) with diffusers' config fields and parameter names.

    Keyword arguments are diffusers' ``UNet2DConditionModel`` config fields (unknown ones raise
    ValueError); ``rngs`` seeds the random init and ``dtype`` is the parameter/computation dtype.
    """

    def __init__(self, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32, **config: Any) -> None:
        cfg = ucc.resolve_config(config, ucc.UNET_2D_CONDITION_DEFAULTS, "UNet2DConditionModel")
        plan = ucc.unet_2d_condition_plan(cfg)  # validates; ValueError names the bad option
        rngs = self._setup(cfg, plan, rngs, dtype)
        channels = plan.block_out_channels
        self.conv_in = conv(
            plan.in_channels, channels[0], plan.conv_in_kernel, rngs, dtype, padding=plan.conv_in_kernel // 2
        )
        self._build_embeddings(plan.time, plan.encoder_hid_proj, rngs, dtype)
        self.add_embedding = build_add_embedding(plan.addition, rngs, dtype)
        self.down_blocks = nnx.List([build_down_block(b, rngs, dtype) for b in plan.down])
        self.mid_block = build_mid_block(plan.mid, rngs, dtype) if plan.mid is not None else None
        self.up_blocks = nnx.List([build_up_block(b, rngs, dtype) for b in plan.up])
        self.conv_norm_out = (
            group_norm(channels[0], plan.norm_out_groups, plan.norm_eps, rngs, dtype)
            if plan.norm_out_groups is not None
            else None
        )
        self.conv_act = get_activation(plan.act_fn)
        self.conv_out = conv(
            channels[0], plan.out_channels, plan.conv_out_kernel, rngs, dtype, padding=plan.conv_out_kernel // 2
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> UNet2DConditionModel:
        """Build from a diffusers ``config.json`` mapping; ``kwargs`` (``rngs``, ``dtype``) go to the constructor."""
        return cls(**ucc.unet_2d_condition_kwargs(config), **kwargs)

    def __call__(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        class_labels: Any = None,
        timestep_cond: Any = None,
        attention_mask: Any = None,
        down_block_additional_residuals: Sequence[Any] | None = None,
        mid_block_additional_residual: Any = None,
        encoder_attention_mask: Any = None,
        added_cond_kwargs: Mapping[str, Any] | None = None,
    ) -> jax.Array:
        """Predict the model output for ``sample`` (B, C, H, W) at ``timestep`` given the text context (B, S, D).

        ``attention_mask``/``encoder_attention_mask``: (B, tokens) keep(1)/discard(0) masks for self-/cross-attention
        keys, as diffusers applies them. ControlNet residuals (NCHW): pass both or neither. ``added_cond_kwargs``:
        the ``addition_embed_type`` inputs (SDXL: ``{"text_embeds": (B, D), "time_ids": (B, 6)}``).
        """
        x = to_nhwc(sample, "sample", self.dtype)  # (B, H, W, C)
        if self.plan.center_input_sample:
            x = 2 * x - 1.0
        ctx = AttentionContext(
            self._context(encoder_hidden_states),  # (B, S, D_ctx)
            attention_mask=attention_mask_bias(attention_mask, x),  # (B, 1, HW) or None
            encoder_attention_mask=attention_mask_bias(encoder_attention_mask, x),  # (B, 1, S) or None
        )
        aug = embed_addition(  # (B, D) or None
            self.add_embedding, self.plan.addition, self._context(encoder_hidden_states, False), added_cond_kwargs,
            self.dtype,
        )  # fmt: skip
        emb = self._embed(batch_timesteps(timestep, x.shape[0]), class_labels, timestep_cond, aug)  # (B, D)
        x, skips = run_down(self.down_blocks, self.conv_in(x), emb, ctx)
        skips = self._add_down_residuals(skips, down_block_additional_residuals, mid_block_additional_residual)
        x = run_mid(self.mid_block, x, emb, ctx)
        if mid_block_additional_residual is not None:
            x = x + to_nhwc(mid_block_additional_residual, "mid_block_additional_residual", self.dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if skips and skips[-1] is not None else None
            if type(block) is UpBlock2D:  # the cross-attention up blocks subclass it
                x = block(x, res, emb, upsample_size=size)
            else:
                x = block(x, res, emb, ctx, upsample_size=size)
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        return jnp.transpose(self.conv_out(x), (0, 3, 1, 2))  # (B, C_out, H, W)

    def _add_down_residuals(
        self, skips: tuple[jax.Array | None, ...], residuals: Sequence[Any] | None, mid: Any
    ) -> tuple[jax.Array | None, ...]:
        """Add ControlNet's per-skip residuals (NCHW) to the down-path skips."""
        if (residuals is None) != (mid is None):
            raise ValueError(
                "down_block_additional_residuals, mid_block_additional_residual: pass both (ControlNet) or neither"
            )
        if residuals is None:
            return skips
        if len(residuals) != len(skips) or any(s is None for s in skips):
            raise ValueError(
                f"down_block_additional_residuals: expected {len(skips)} arrays (one per skip), got {len(residuals)}"
            )
        return tuple(
            s + to_nhwc(r, "down_block_additional_residuals", self.dtype) for s, r in zip(skips, residuals, strict=True)
        )


def run_down(
    blocks: nnx.List, x: jax.Array, emb: jax.Array, ctx: AttentionContext
) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
    """Down path from the ``conv_in`` output; returns the lowest-resolution state and every skip."""
    skips: tuple[jax.Array | None, ...] = (x,)
    for block in blocks:
        x, outputs = block(x, emb) if type(block) is DownBlock2D else block(x, emb, ctx)  # cross blocks subclass it
        skips += outputs
    return x, skips


def run_mid(mid: nnx.Module | None, x: jax.Array, emb: jax.Array, ctx: AttentionContext) -> jax.Array:
    if mid is None:
        return x
    return mid(x, emb) if isinstance(mid, UNetMidBlock2D) else mid(x, emb, ctx)
