"""PyTorch attention and transformer layers of the conditional UNets, with diffusers' parameter names.

``Attention`` (``to_q``/``to_k``/``to_v``/``to_out.0``, optional ``norm_cross``), ``FeedForward``
with GEGLU or GELU (``ff.net.0.proj``, ``ff.net.2``), ``BasicTransformerBlock`` (``norm1``/``attn1``/
``norm2``/``attn2``/``norm3``/``ff``) and ``Transformer2DModel`` (``norm``, ``proj_in``,
``transformer_blocks``, ``proj_out``) as in diffusers 0.42.1, and the K-UNet's ``KAttentionBlock``.
Masks are additive biases of shape (B, 1, S) over the key tokens (the UNet turns 0/1 masks into
biases once, with ``diffusion_core.models.attention.attention_mask_bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.models.attention import K_GROUP_SIZE, AttentionContext, attention_norm_groups
from diffusion_core.torch.models.layers import AdaGroupNorm


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention over token sequences (B, T, C)."""

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
    ) -> None:
        super().__init__()
        if cross_attention_norm not in (None, "layer_norm"):
            raise ValueError(
                f"cross_attention_norm: unsupported value {cross_attention_norm!r}; accepted: None, 'layer_norm'"
            )
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.norm_cross = nn.LayerNorm(kv_dim) if cross_attention_norm == "layer_norm" else None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``hidden_states`` (B, T, C) to ``encoder_hidden_states`` (B, S, C_kv), or to itself."""
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif self.norm_cross is not None:
            encoder_hidden_states = self.norm_cross(encoder_hidden_states)
        q = self._split_heads(self.to_q(hidden_states))  # (B, heads, T, head_dim)
        k = self._split_heads(self.to_k(encoder_hidden_states))  # (B, heads, S, head_dim)
        v = self._split_heads(self.to_v(encoder_hidden_states))
        mask = None if attention_mask is None else attention_mask[:, None].to(q.dtype)  # (B, 1, 1 or T, S)
        dtype = q.dtype
        if self.upcast_attention and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()  # softmax(QK^T) in float32 (SD 2.x overflow guard)
            mask = None if mask is None else mask.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # (B, T, inner_dim)
        return self.to_out[1](self.to_out[0](out))  # (B, T, C)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(b)`` with ``[a | b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)  # 2 x (B, T, dim_out)
        return hidden_states * F.gelu(gate)


class GELU(nn.Module):
    """``gelu(proj(x))`` (diffusers' ``GELU`` with its ``proj``: the "gelu" feed-forward of the unCLIP prior)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states))


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELU}


class FeedForward(nn.Module):
    """``net.0`` GEGLU (or GELU) to ``mult * dim``, ``net.1`` dropout, ``net.2`` linear back to ``dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation_fn: str = "geglu") -> None:
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(
                f"activation_fn: unsupported {activation_fn!r}; accepted: {list(FEED_FORWARD_ACTIVATIONS)}"
            )
        inner_dim = dim * mult
        act = FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner_dim)
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU feed-forward.

    ``only_cross_attention``: ``attn1`` attends to the encoder states too. ``double_self_attention``:
    ``attn2`` is a second self-attention (no ``cross_attention_dim``).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
    ) -> None:
        super().__init__()
        if only_cross_attention and cross_attention_dim is None:
            raise ValueError("only_cross_attention: needs a cross_attention_dim")
        self.only_cross_attention = only_cross_attention
        self.double_self_attention = double_self_attention
        attn = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
        )
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **attn)
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=1e-5)
            self.attn2 = Attention(dim, None if double_self_attention else cross_attention_dim, **attn)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), context, attention_mask) + hidden_states
        if self.attn2 is not None:
            context = None if self.double_self_attention else encoder_hidden_states
            hidden_states = self.attn2(self.norm2(hidden_states), context, encoder_attention_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual around it.

    ``norm`` is GroupNorm (eps 1e-6); ``proj_in``/``proj_out`` are 1x1 convs, or linears with
    ``use_linear_projection`` (SD 2.x). Inner width is ``num_attention_heads * attention_head_dim``.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
            )
            for _ in range(num_layers)
        )
        if use_linear_projection:
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        batch, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # (B, inner, H, W)
        tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, HW, C or inner)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)  # (B, HW, C)
        hidden_states = tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()  # (B, *, H, W)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, C, H, W)
        return hidden_states + residual


class KAttentionBlock(nn.Module):
    """AdaGroupNorm-conditioned (optional self-) and cross-attention on a feature map, each residual."""

    def __init__(
        self,
        dim: int,
        attention_head_dim: int,
        cross_attention_dim: int | None,
        temb_channels: int,
        add_self_attention: bool = False,
        upcast_attention: bool = False,
        group_size: int = K_GROUP_SIZE,
    ) -> None:
        super().__init__()
        groups, heads = attention_norm_groups(dim, group_size), dim // attention_head_dim
        self.norm1 = self.attn1 = None
        if add_self_attention:
            self.norm1 = AdaGroupNorm(temb_channels, dim, groups)
            self.attn1 = Attention(dim, None, heads=heads, dim_head=attention_head_dim, bias=True)
        self.norm2 = AdaGroupNorm(temb_channels, dim, groups)
        self.attn2 = Attention(
            dim, cross_attention_dim, heads=heads, dim_head=attention_head_dim, bias=True,
            upcast_attention=upcast_attention, cross_attention_norm="layer_norm",
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.attn1 is not None:
            out = self._run(self.attn1, self.norm1(hidden_states, emb), None, ctx.attention_mask)
            hidden_states = out + hidden_states
        cross_mask = ctx.attention_mask if ctx.encoder_hidden_states is None else ctx.encoder_attention_mask
        out = self._run(self.attn2, self.norm2(hidden_states, emb), ctx.encoder_hidden_states, cross_mask)
        return out + hidden_states

    @staticmethod
    def _run(attn: Attention, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)
        out = attn(tokens, context, mask)  # (B, HW, C)
        return out.permute(0, 2, 1).reshape(batch, channels, height, width)  # (B, C, H, W)
