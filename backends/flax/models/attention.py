"""Flax NNX attention layers of the conditional UNets: Attention, FeedForward, transformer blocks.

Attribute names mirror diffusers 0.42.1 (``to_q``, ``to_out[0]``, ``norm_cross``, ``ff.net[0].proj``,
``ff.net[2]``, ``transformer_blocks[i]``, ``proj_in``/``proj_out``), so the converter in
``diffusion_core.weights.convert`` fills them from a diffusers state dict. Token tensors are
(B, L, C); feature maps are NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.flax.models.layers import (
    AdaGroupNorm,
    conv,
    group_norm,
    layer_norm,
    linear,
    make_dropout,
    scaled_dot_product_attention,
)
from diffusion_core.models.attention import K_GROUP_SIZE, AttentionContext, attention_norm_groups


class Attention(nnx.Module):
    """Multi-head scaled dot-product attention, self (no context) or cross (``encoder_hidden_states``).

    ``cross_attention_norm="layer_norm"`` normalises the context first (``norm_cross``), as the
    K-blocks of the latent upscaler do; ``upcast_attention`` computes the attention in float32.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        cross_attention_norm: str | None = None,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        if cross_attention_norm not in (None, "layer_norm"):
            raise ValueError(
                f"cross_attention_norm: unsupported value {cross_attention_norm!r}; accepted: [None, 'layer_norm']"
            )
        context_dim = cross_attention_dim or query_dim
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.norm_cross = layer_norm(context_dim, rngs, dtype) if cross_attention_norm else None
        self.to_q = linear(query_dim, inner_dim, rngs, dtype, bias=bias)
        self.to_k = linear(context_dim, inner_dim, rngs, dtype, bias=bias)
        self.to_v = linear(context_dim, inner_dim, rngs, dtype, bias=bias)
        self.to_out = nnx.List([linear(inner_dim, query_dim, rngs, dtype), make_dropout(dropout, rngs)])

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """(B, L, C) queries attend to the context (B, S, C_ctx) or to themselves.

        ``attention_mask``: a (B, 1 or L, S) additive bias (``attention_mask_bias``), or None.
        """
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states if self.norm_cross is None else self.norm_cross(encoder_hidden_states)
        q = self._split_heads(self.to_q(hidden_states))  # (B, L, heads, head_dim)
        k = self._split_heads(self.to_k(context))  # (B, S, heads, head_dim)
        v = self._split_heads(self.to_v(context))  # (B, S, heads, head_dim)
        dtype = q.dtype
        if self.upcast_attention:
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        bias = None if attention_mask is None else jnp.asarray(attention_mask)[:, None].astype(q.dtype)  # (B,1,*,S)
        out = scaled_dot_product_attention(q, k, v, bias).astype(dtype)  # (B, L, heads, head_dim)
        out = out.reshape(out.shape[0], out.shape[1], -1)  # (B, L, inner_dim)
        return self.to_out[1](self.to_out[0](out))  # (B, L, query_dim)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1)  # (B, L, heads, head_dim)


class GEGLU(nnx.Module):
    """Gated GELU (Shazeer 2020): ``proj`` to 2x width, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: jnp.dtype) -> None:
        self.proj = linear(dim_in, 2 * dim_out, rngs, dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(hidden_states), 2, axis=-1)  # 2 x (B, L, dim_out)
        return value * jax.nn.gelu(gate, approximate=False)


class GELU(nnx.Module):
    """``gelu(proj(x))`` (diffusers' ``GELU`` with its ``proj``: the "gelu" feed-forward of the unCLIP prior)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: jnp.dtype) -> None:
        self.proj = linear(dim_in, dim_out, rngs, dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(hidden_states), approximate=False)


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELU}


class FeedForward(nnx.Module):
    """``net = [GEGLU (or GELU)(dim, 4 dim), Dropout, Linear(4 dim, dim)]`` (diffusers' default "geglu")."""

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "geglu",
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ) -> None:
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(
                f"activation_fn: unsupported {activation_fn!r}; accepted: {list(FEED_FORWARD_ACTIVATIONS)}"
            )
        inner_dim = dim * mult
        self.net = nnx.List(
            [
                FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner_dim, rngs=rngs, dtype=dtype),
                make_dropout(dropout, rngs),
                linear(inner_dim, dim, rngs, dtype),
            ]
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual.

    ``only_cross_attention`` makes ``attn1`` attend to the context too; ``double_self_attention``
    makes ``attn2`` a second self-attention.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        activation_fn: str = "geglu",
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        self.only_cross_attention = only_cross_attention
        self.double_self_attention = double_self_attention

        def attention(context_dim: int | None) -> Attention:
            return Attention(
                dim, context_dim, num_attention_heads, attention_head_dim, dropout, attention_bias, upcast_attention,
                rngs=rngs, dtype=dtype,
            )  # fmt: skip

        self.norm1 = layer_norm(dim, rngs, dtype, norm_eps)
        self.attn1 = attention(cross_attention_dim if only_cross_attention else None)
        has_attn2 = cross_attention_dim is not None or double_self_attention
        self.norm2 = layer_norm(dim, rngs, dtype, norm_eps) if has_attn2 else None
        self.attn2 = attention(None if double_self_attention else cross_attention_dim) if has_attn2 else None
        self.norm3 = layer_norm(dim, rngs, dtype, norm_eps)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), context, attention_mask)
        if self.attn2 is not None:
            context = None if self.double_self_attention else encoder_hidden_states
            hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), context, encoder_attention_mask)
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2DModel(nnx.Module):
    """GroupNorm, ``proj_in`` (1x1 conv or linear), transformer blocks over H*W tokens, ``proj_out``, residual."""

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, rngs, dtype)
        if use_linear_projection:
            self.proj_in = linear(in_channels, inner_dim, rngs, dtype)
            self.proj_out = linear(inner_dim, in_channels, rngs, dtype)
        else:
            self.proj_in = conv(in_channels, inner_dim, 1, rngs, dtype, padding=0)
            self.proj_out = conv(inner_dim, in_channels, 1, rngs, dtype, padding=0)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim,
                    dropout=dropout,
                    only_cross_attention=only_cross_attention,
                    upcast_attention=upcast_attention,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        residual = hidden_states
        batch, height, width, _ = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # (B, H, W, inner)
        tokens = hidden_states.reshape(batch, height * width, -1)  # (B, HW, C or inner)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)  # (B, HW, C)
            return tokens.reshape(batch, height, width, -1) + residual  # (B, H, W, C)
        out = self.proj_out(tokens.reshape(batch, height, width, -1))  # (B, H, W, C)
        return out + residual


class KAttentionBlock(nnx.Module):
    """Feed-forward-free transformer block of the K-UNet: AdaGroupNorm'd [self-attention,] cross-attention.

    Both attentions have biased projections and ``dim // attention_head_dim`` heads; the cross-attention
    LayerNorms its context (``norm_cross``). Each is residual.
    """

    def __init__(
        self,
        dim: int,
        attention_head_dim: int,
        cross_attention_dim: int | None,
        temb_channels: int,
        add_self_attention: bool = False,
        upcast_attention: bool = False,
        group_size: int = K_GROUP_SIZE,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        groups, heads = attention_norm_groups(dim, group_size), dim // attention_head_dim
        self.norm1 = AdaGroupNorm(temb_channels, dim, groups, rngs=rngs, dtype=dtype) if add_self_attention else None
        self.attn1 = (
            Attention(dim, None, heads, attention_head_dim, bias=True, rngs=rngs, dtype=dtype)
            if add_self_attention
            else None
        )
        self.norm2 = AdaGroupNorm(temb_channels, dim, groups, rngs=rngs, dtype=dtype)
        self.attn2 = Attention(
            dim, cross_attention_dim, heads, attention_head_dim, bias=True,
            upcast_attention=upcast_attention, cross_attention_norm="layer_norm", rngs=rngs, dtype=dtype,
        )  # fmt: skip

    def __call__(self, hidden_states: jax.Array, emb: jax.Array, ctx: AttentionContext) -> jax.Array:
        if self.attn1 is not None:
            out = self._run(self.attn1, self.norm1(hidden_states, emb), None, ctx.attention_mask)
            hidden_states = hidden_states + out
        cross_mask = ctx.attention_mask if ctx.encoder_hidden_states is None else ctx.encoder_attention_mask
        out = self._run(self.attn2, self.norm2(hidden_states, emb), ctx.encoder_hidden_states, cross_mask)
        return hidden_states + out

    @staticmethod
    def _run(attn: Attention, x: jax.Array, context: jax.Array | None, mask: jax.Array | None) -> jax.Array:
        batch, height, width, channels = x.shape
        out = attn(x.reshape(batch, height * width, channels), context, mask)  # (B, HW, C)
        return out.reshape(batch, height, width, channels)  # (B, H, W, C)
