"""Per-layer constructor arguments of the conditional UNet blocks, resolved once from a ``BlockPlan``.

Both backends build their ``Transformer2DModel``s, K-UNet ``ResnetBlockCondNorm2D``s and
``KAttentionBlock``s from these keyword dicts, so the channel and group bookkeeping of diffusers'
blocks (which width each layer sees, how many GroupNorm groups it uses) is written here only.
"""

from __future__ import annotations

from typing import Any

from diffusion_core.models.unet_condition_config import BlockPlan

Kwargs = dict[str, Any]


def transformer_kwargs(plan: BlockPlan, num_layers: int) -> Kwargs:
    """``Transformer2DModel`` over the block's output width with ``num_layers`` transformer blocks."""
    return {
        "num_attention_heads": plan.num_attention_heads,
        "attention_head_dim": plan.attention_head_dim,
        "in_channels": plan.out_channels,
        "num_layers": num_layers,
        "norm_num_groups": plan.norm_groups,
        "cross_attention_dim": plan.cross_attention_dim,
        "use_linear_projection": plan.use_linear_projection,
        "only_cross_attention": plan.only_cross_attention,
        "upcast_attention": plan.upcast_attention,
    }


def k_resnet_kwargs(plan: BlockPlan, in_ch: int, out_ch: int, conv_out: int | None = None) -> Kwargs:
    """K resnet; GroupNorm groups come from its input width and the block width (diffusers' rule)."""
    return {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "temb_channels": plan.temb_channels,
        "groups": in_ch // plan.group_size,
        "groups_out": plan.out_channels // plan.group_size,
        "eps": plan.norm_eps,
        "non_linearity": plan.act_fn,
        "conv_2d_out_channels": conv_out,
        "dropout": plan.dropout,
    }


def k_attention_kwargs(plan: BlockPlan, dim: int, add_self_attention: bool, upcast_attention: bool) -> Kwargs:
    """``KAttentionBlock`` over ``dim`` channels."""
    return {
        "dim": dim,
        "attention_head_dim": plan.attention_head_dim or 1,
        "cross_attention_dim": plan.cross_attention_dim,
        "temb_channels": plan.temb_channels,
        "add_self_attention": add_self_attention,
        "upcast_attention": upcast_attention,
        "group_size": plan.group_size,
    }


def k_down_layers(plan: BlockPlan, has_attention: bool) -> list[tuple[Kwargs, Kwargs | None]]:
    """(resnet, attention or None) per layer of a K down block; its attentions never upcast (as diffusers)."""
    out = plan.out_channels
    return [
        (
            k_resnet_kwargs(plan, plan.in_channels if i == 0 else out, out),
            k_attention_kwargs(plan, out, plan.add_self_attention, False) if has_attention else None,
        )
        for i in range(plan.num_layers)
    ]


def k_up_layers(plan: BlockPlan, has_attention: bool) -> list[tuple[Kwargs, Kwargs | None]]:
    """(resnet, attention or None) per layer of a K up block: ``num_layers - 1`` layers.

    The first cross block (in == out == temb width) takes no skip and self-attends too; the last
    layer narrows to ``in_channels`` (the next block's width), with a cross block's resnet ending in
    a conv to it.
    """
    out = plan.out_channels
    first = plan.add_self_attention  # the first cross block (in == out == temb width): no skip to concat
    k_in = out if first else 2 * out
    n = plan.num_layers - 1
    layers = []
    for i in range(n):
        last = i == n - 1
        in_ch = k_in if i == 0 else out
        if has_attention:
            conv_out = plan.in_channels if last and plan.in_channels != out else None
            resnet = k_resnet_kwargs(plan, in_ch, out, conv_out)
            dim = plan.in_channels if last else out
            layers.append((resnet, k_attention_kwargs(plan, dim, first, plan.upcast_attention)))
        else:
            layers.append((k_resnet_kwargs(plan, in_ch, plan.in_channels if last else out), None))
    return layers
