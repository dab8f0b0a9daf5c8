"""Flax NNX ``ControlNetModel`` (Zhang et al. 2023): a UNet encoder copy whose zero-conv outputs steer a UNet.

It returns ``(down_block_res_samples, mid_block_res_sample)`` as NCHW arrays, ready for
``UNet2DConditionModel(..., down_block_additional_residuals=..., mid_block_additional_residual=...)``.
Config fields and parameter names are diffusers 0.42.1's; the config is resolved once into a plan by
``diffusion_core.models.unet_condition_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_core.flax.models.embeddings import build_add_embedding, embed_addition
from diffusion_core.flax.models.layers import conv
from diffusion_core.flax.models.modeling import PretrainedMixin
from diffusion_core.flax.models.unet_2d_condition import (
    ConditionEmbeddings,
    UNet2DConditionModel,
    batch_timesteps,
    run_down,
    run_mid,
    to_nhwc,
)
from diffusion_core.flax.models.unet_2d_condition_blocks import build_down_block, build_mid_block
from diffusion_core.models import unet_condition_config as ucc
from diffusion_core.models.attention import AttentionContext, attention_mask_bias


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image -> latent-resolution features: ``conv_in``, stride-2 conv pairs (``blocks``), zero ``conv_out``."""

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int,
        block_out_channels: tuple[int, ...],
        *,
        rngs: nnx.Rngs,
        dtype: Any,
    ) -> None:
        self.conv_in = conv(conditioning_channels, block_out_channels[0], 3, rngs, dtype)
        blocks = []
        for channel_in, channel_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            blocks.append(conv(channel_in, channel_in, 3, rngs, dtype))
            blocks.append(conv(channel_in, channel_out, 3, rngs, dtype, stride=2))
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(block_out_channels[-1], conditioning_embedding_channels, 3, rngs, dtype, zero_init=True)

    def __call__(self, conditioning: jax.Array) -> jax.Array:
        embedding = jax.nn.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = jax.nn.silu(block(embedding))
        return self.conv_out(embedding)


class ControlNetModel(ConditionEmbeddings, PretrainedMixin, nnx.Module):
    """ControlNet with diffusers' config fields (keyword arguments; unknown ones raise ValueError) and names."""

    def __init__(self, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32, **config: Any) -> None:
        cfg = ucc.resolve_config(config, ucc.CONTROLNET_DEFAULTS, "ControlNetModel")
        plan = ucc.controlnet_plan(cfg)  # validates; ValueError names the bad option
        rngs = self._setup(cfg, plan, rngs, dtype)
        first = plan.block_out_channels[0]
        self.conv_in = conv(plan.in_channels, first, 3, rngs, dtype)
        self._build_embeddings(plan.time, plan.encoder_hid_proj, rngs, dtype)
        self.add_embedding = build_add_embedding(plan.addition, rngs, dtype)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            first, plan.conditioning_channels, plan.conditioning_embedding_out_channels, rngs=rngs, dtype=dtype
        )
        self.down_blocks = nnx.List([build_down_block(b, rngs, dtype) for b in plan.down])
        self.controlnet_down_blocks = nnx.List(
            [conv(c, c, 1, rngs, dtype, padding=0, zero_init=True) for c in plan.controlnet_down_channels]
        )
        self.mid_block = build_mid_block(plan.mid, rngs, dtype)
        mid = plan.block_out_channels[-1]
        self.controlnet_mid_block = conv(mid, mid, 1, rngs, dtype, padding=0, zero_init=True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> ControlNetModel:
        """Build from a diffusers ``config.json`` mapping; ``kwargs`` (``rngs``, ``dtype``) go to the constructor."""
        return cls(**ucc.controlnet_kwargs(config), **kwargs)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
        seed: int = 0,
    ) -> ControlNetModel:
        """A ControlNet sharing ``unet``'s encoder config (and, by default, copies of its encoder weights).

        The zero convolutions start at zero, so the new ControlNet leaves the UNet's output unchanged.
        The other conditioning-embedding convs get torch's default Conv2d init, drawn on the host from ``seed``.
        """
        config = {k: v for k, v in unet.config.items() if k in ucc.CONTROLNET_DEFAULTS}
        config.update(
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        )
        if not load_weights_from_unet:
            return cls(**config, rngs=nnx.Rngs(seed), dtype=unet.dtype)
        # Built abstractly, then filled on the host: eager XLA initialisation is slow on CPU.
        model = nnx.eval_shape(lambda: cls(**config, dtype=unet.dtype))
        names = ("conv_in", "time_embedding", "class_embedding", "encoder_hid_proj", "add_embedding", "down_blocks")
        for name in (*names, "mid_block"):
            source = getattr(unet, name, None)  # add_embedding: only with an addition_embed_type
            if source is not None:
                nnx.update(getattr(model, name), jax.tree_util.tree_map(jnp.copy, nnx.state(source, nnx.Param)))
        rng = np.random.default_rng(seed)
        embedding = model.controlnet_cond_embedding
        for layer in (embedding.conv_in, *embedding.blocks):
            kernel = layer.kernel
            bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))  # kaiming-uniform(a=sqrt(5)) over fan_in = kh*kw*in
            for var in (kernel, layer.bias):
                var.set_value(jnp.asarray(rng.uniform(-bound, bound, var.shape), var.dtype))
        for zero_conv in (*model.controlnet_down_blocks, model.controlnet_mid_block, embedding.conv_out):
            for var in (zero_conv.kernel, zero_conv.bias):
                var.set_value(jnp.zeros(var.shape, var.dtype))
        return model

    def __call__(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        controlnet_cond: Any,
        conditioning_scale: Any = 1.0,
        class_labels: Any = None,
        timestep_cond: Any = None,
        attention_mask: Any = None,
        guess_mode: bool = False,
        added_cond_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Residuals for the UNet: (one NCHW array per down skip, the NCHW mid residual).

        ``controlnet_cond``: the (B, conditioning_channels, 8H, 8W) control image. ``guess_mode``
        (static) scales residual i by ``10**(i/n - 1)``, shallow ones least; ``conditioning_scale``
        may be a traced scalar. ``attention_mask``: (B, HW) keep(1)/discard(0) self-attention mask, as diffusers.
        """
        x = to_nhwc(sample, "sample", self.dtype)  # (B, H, W, C)
        cond = to_nhwc(controlnet_cond, "controlnet_cond", self.dtype)  # (B, 8H, 8W, C_cond)
        if self.plan.flip_channels:
            cond = cond[..., ::-1]  # bgr checkpoints
        context = self._context(encoder_hidden_states, project=False)  # diffusers never applies encoder_hid_proj here
        aug = embed_addition(self.add_embedding, self.plan.addition, context, added_cond_kwargs, self.dtype)  # (B, D)
        emb = self._embed(batch_timesteps(timestep, x.shape[0]), class_labels, timestep_cond, aug)  # (B, D)
        ctx = AttentionContext(context, attention_mask=attention_mask_bias(attention_mask, x))
        x = self.conv_in(x) + self.controlnet_cond_embedding(cond)
        x, skips = run_down(self.down_blocks, x, emb, ctx)
        x = run_mid(self.mid_block, x, emb, ctx)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        guess = guess_mode and not self.plan.global_pool_conditions
        scales = ucc.controlnet_residual_scales(len(down), 1.0, guess)  # conditioning_scale may be traced
        factors = [jnp.asarray(f * conditioning_scale).astype(self.dtype) for f in scales]
        down = [d * f for d, f in zip(down, factors[:-1], strict=True)]
        mid = mid * factors[-1]
        if self.plan.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return tuple(_to_nchw(d, self.dtype) for d in down), _to_nchw(mid, self.dtype)


def _to_nchw(x: jax.Array, dtype: Any) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2)).astype(dtype)  # (B, C, H, W)
