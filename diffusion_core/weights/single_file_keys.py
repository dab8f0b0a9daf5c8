"""Key plans from CompVis / Stable Diffusion 1.x-2.x / SGM SDXL single-file names to diffusers/transformers names.

A plan is a list of :class:`Entry`: one diffusers (or transformers 5) state-dict key, its shape as
the diffusers model built from ``config`` holds it, and where it comes from in the original
checkpoint (a key relative to the component's prefix, and optionally a row block of it). Plans are
built from the component's config alone (diffusers ``config.json`` fields, or transformers'
``CLIPTextConfig`` fields), so a checkpoint can be checked key by key and shape by shape before
any tensor is read. Numpy-free: names and shapes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_core.models.model_config import per_block

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One target tensor: ``target`` (diffusers key) of ``shape``, read from ``source``.

    ``part = (index, count)`` takes the ``index``-th of ``count`` equal row blocks of the source
    (OpenCLIP's fused ``in_proj`` holds q, k and v stacked along axis 0). ``transpose``: the source is
    the (2-D) transpose of the target (OpenCLIP's ``text_projection`` is ``x @ P``, a linear layer's ``P.T``).
    """

    source: str
    target: str
    shape: Shape
    part: tuple[int, int] | None = None
    transpose: bool = False


def _affine(src: str, dst: str, weight: Shape, bias: bool = True) -> list[Entry]:
    """A layer with ``weight`` (linear, conv or norm) and, if ``bias``, a bias of ``weight[0]`` entries."""
    entries = [Entry(f"{src}.weight", f"{dst}.weight", weight)]
    if bias:
        entries.append(Entry(f"{src}.bias", f"{dst}.bias", weight[:1]))
    return entries


def _conv(src: str, dst: str, cout: int, cin: int, k: int) -> list[Entry]:
    return _affine(src, dst, (cout, cin, k, k))


def _norm(src: str, dst: str, channels: int) -> list[Entry]:
    return _affine(src, dst, (channels,))


# ----------------------------------------------------------------------------- UNet

_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "use_linear_projection": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_dim": None,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
}
# Config fields whose non-default values add weights this plan does not know (SDXL, Kandinsky, ...).
_UNET_UNSUPPORTED = {
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "time_embedding_type": "positional",
    "reverse_transformer_layers_per_block": None,
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


@dataclass(frozen=True)
class _UNetDims:
    temb: int  # time-embedding width seen by the resnets
    scale_shift: int  # 2 when the resnets' time projection predicts scale and shift
    linear: bool  # use_linear_projection: proj_in/proj_out are linear, else 1x1 convs


def _unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**_UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, default in _UNET_UNSUPPORTED.items():
        if cfg.get(name, default) != default:
            raise ValueError(
                f"config[{name!r}] = {cfg[name]!r} is not supported by the CompVis single-file converter "
                f"(Stable Diffusion 1.x/2.x UNets only; expected {default!r})"
            )
    n = len(cfg["down_block_types"])
    for field, kinds in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        bad = [t for t in cfg[field] if t not in kinds]
        if bad or len(cfg[field]) != n:
            raise ValueError(f"config[{field!r}] must list {n} of {sorted(kinds)}, got {list(cfg[field])}")
    if cfg["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(
            f"config['mid_block_type'] must be 'UNetMidBlock2DCrossAttn' or None, got {cfg['mid_block_type']!r}"
        )
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(
            f"config['addition_embed_type'] must be None or 'text_time' (SDXL), got {cfg['addition_embed_type']!r}"
        )
    if cfg.get("addition_embed_type") and not isinstance(cfg["projection_class_embeddings_input_dim"], int):
        raise ValueError(
            "config['projection_class_embeddings_input_dim'] must be an int when addition_embed_type is set"
        )
    if cfg["class_embed_type"] not in (None, "projection"):
        raise ValueError(f"config['class_embed_type'] must be None or 'projection', got {cfg['class_embed_type']!r}")
    heads = cfg["num_attention_heads"] or cfg["attention_head_dim"]
    for name, value in (("heads", heads), ("cross_attention_dim", cfg["cross_attention_dim"])):
        cfg[name] = per_block({name: value}, name, n)
    for name in ("layers_per_block", "transformer_layers_per_block", "only_cross_attention"):
        cfg[name] = per_block(cfg, name, n)
    return cfg


def _unet_resnet(src: str, dst: str, cin: int, cout: int, dims: _UNetDims) -> list[Entry]:
    entries = _norm(f"{src}.in_layers.0", f"{dst}.norm1", cin)
    entries += _conv(f"{src}.in_layers.2", f"{dst}.conv1", cout, cin, 3)
    entries += _affine(f"{src}.emb_layers.1", f"{dst}.time_emb_proj", (cout * dims.scale_shift, dims.temb))
    entries += _norm(f"{src}.out_layers.0", f"{dst}.norm2", cout)
    entries += _conv(f"{src}.out_layers.3", f"{dst}.conv2", cout, cout, 3)
    if cin != cout:
        entries += _conv(f"{src}.skip_connection", f"{dst}.conv_shortcut", cout, cin, 1)
    return entries


def _unet_transformer(src: str, dst: str, channels: int, cfg: dict[str, Any], block: int, dims: _UNetDims):
    """A SpatialTransformer (CompVis) == Transformer2DModel (diffusers); the inner names are shared."""
    heads = cfg["heads"][block]
    inner = heads * (channels // heads)
    cross = cfg["cross_attention_dim"][block]
    proj_in = (inner, channels) if dims.linear else (inner, channels, 1, 1)
    proj_out = (channels, inner) if dims.linear else (channels, inner, 1, 1)
    entries = _norm(f"{src}.norm", f"{dst}.norm", channels) + _affine(f"{src}.proj_in", f"{dst}.proj_in", proj_in)
    for t in range(cfg["transformer_layers_per_block"][block]):
        name = f"transformer_blocks.{t}"
        self_kv = cross if cfg["only_cross_attention"][block] else inner
        for attn, kv in (("attn1", self_kv), ("attn2", cross)):
            for proj, width in (("to_q", inner), ("to_k", kv), ("to_v", kv)):
                entries += _affine(f"{src}.{name}.{attn}.{proj}", f"{dst}.{name}.{attn}.{proj}", (inner, width), False)
            entries += _affine(f"{src}.{name}.{attn}.to_out.0", f"{dst}.{name}.{attn}.to_out.0", (inner, inner))
        for sub, shape in (("ff.net.0.proj", (8 * inner, inner)), ("ff.net.2", (inner, 4 * inner))):  # GEGLU
            entries += _affine(f"{src}.{name}.{sub}", f"{dst}.{name}.{sub}", shape)
        for norm in ("norm1", "norm2", "norm3"):
            entries += _norm(f"{src}.{name}.{norm}", f"{dst}.{name}.{norm}", inner)
    return entries + _affine(f"{src}.proj_out", f"{dst}.proj_out", proj_out)


def _unet_embeddings(cfg: dict[str, Any], temb: int) -> list[Entry]:
    boc0 = cfg["block_out_channels"][0]
    entries = _conv("input_blocks.0.0", "conv_in", boc0, cfg["in_channels"], cfg["conv_in_kernel"])
    entries += _affine("time_embed.0", "time_embedding.linear_1", (temb, boc0))
    entries += _affine("time_embed.2", "time_embedding.linear_2", (temb, temb))
    if cfg["class_embed_type"] == "projection":
        width = cfg["projection_class_embeddings_input_dim"]
        entries += _affine("label_emb.0.0", "class_embedding.linear_1", (temb, width))
        entries += _affine("label_emb.0.2", "class_embedding.linear_2", (temb, temb))
    elif cfg["num_class_embeds"] is not None:
        entries += _affine("label_emb", "class_embedding", (cfg["num_class_embeds"], temb), False)
    if cfg.get("addition_embed_type") == "text_time":  # SGM SDXL: label_emb is the size/crop/pooled-text MLP
        width = cfg["projection_class_embeddings_input_dim"]
        entries += _affine("label_emb.0.0", "add_embedding.linear_1", (temb, width))
        entries += _affine("label_emb.0.2", "add_embedding.linear_2", (temb, temb))
    return entries


def _unet_down(cfg: dict[str, Any], dims: _UNetDims) -> list[Entry]:
    entries, k, boc = [], 1, cfg["block_out_channels"]
    for i, kind in enumerate(cfg["down_block_types"]):
        cin, cout = boc[max(i - 1, 0)], boc[i]
        for j in range(cfg["layers_per_block"][i]):
            dst = f"down_blocks.{i}"
            entries += _unet_resnet(f"input_blocks.{k}.0", f"{dst}.resnets.{j}", cin if j == 0 else cout, cout, dims)
            if _DOWN_TYPES[kind]:
                entries += _unet_transformer(f"input_blocks.{k}.1", f"{dst}.attentions.{j}", cout, cfg, i, dims)
            k += 1
        if i < len(boc) - 1:
            entries += _conv(f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
            k += 1
    return entries


def _unet_up(cfg: dict[str, Any], dims: _UNetDims) -> list[Entry]:
    entries, k, boc, n = [], 0, cfg["block_out_channels"][::-1], len(cfg["block_out_channels"])
    for i, kind in enumerate(cfg["up_block_types"]):
        down = n - 1 - i  # per-block lists are given in down-block order
        prev, cout, skip_in = boc[max(i - 1, 0)], boc[i], boc[min(i + 1, n - 1)]
        layers = cfg["layers_per_block"][down] + 1
        for j in range(layers):
            cin = (prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout)
            dst = f"up_blocks.{i}"
            entries += _unet_resnet(f"output_blocks.{k}.0", f"{dst}.resnets.{j}", cin, cout, dims)
            if _UP_TYPES[kind]:
                entries += _unet_transformer(f"output_blocks.{k}.1", f"{dst}.attentions.{j}", cout, cfg, down, dims)
            if j == layers - 1 and i < n - 1:
                index = 2 if _UP_TYPES[kind] else 1
                entries += _conv(f"output_blocks.{k}.{index}.conv", f"{dst}.upsamplers.0.conv", cout, cout, 3)
            k += 1
    return entries


def unet_plan(config: Mapping[str, Any]) -> list[Entry]:
    """Entries for a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x, inpainting, pix2pix, x4 upscaler, SDXL).

    Sources are relative to ``model.diffusion_model.``. ``use_linear_projection`` sets the target
    shape of ``proj_in``/``proj_out``; the reader adapts a 1x1 conv to a linear layer and back.
    """
    cfg = _unet_config(config)
    boc = cfg["block_out_channels"]
    temb = cfg["time_embedding_dim"] or 4 * boc[0]
    dims = _UNetDims(
        temb=2 * temb if cfg["class_embeddings_concat"] else temb,
        scale_shift=2 if cfg["resnet_time_scale_shift"] == "scale_shift" else 1,
        linear=bool(cfg["use_linear_projection"]),
    )
    entries = _unet_embeddings(cfg, temb) + _unet_down(cfg, dims)
    if cfg["mid_block_type"] is not None:
        mid, last = len(boc) - 1, boc[-1]
        entries += _unet_resnet("middle_block.0", "mid_block.resnets.0", last, last, dims)
        entries += _unet_transformer("middle_block.1", "mid_block.attentions.0", last, cfg, mid, dims)
        entries += _unet_resnet("middle_block.2", "mid_block.resnets.1", last, last, dims)
    entries += _unet_up(cfg, dims)
    entries += _norm("out.0", "conv_norm_out", boc[0])
    entries += _conv("out.2", "conv_out", cfg["out_channels"], boc[0], cfg["conv_out_kernel"])
    return entries


# ----------------------------------------------------------------------------- VAE

_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _vae_resnet(src: str, dst: str, cin: int, cout: int) -> list[Entry]:
    entries = _norm(f"{src}.norm1", f"{dst}.norm1", cin) + _conv(f"{src}.conv1", f"{dst}.conv1", cout, cin, 3)
    entries += _norm(f"{src}.norm2", f"{dst}.norm2", cout) + _conv(f"{src}.conv2", f"{dst}.conv2", cout, cout, 3)
    if cin != cout:
        entries += _conv(f"{src}.nin_shortcut", f"{dst}.conv_shortcut", cout, cin, 1)
    return entries


def _vae_mid(src: str, dst: str, channels: int, attention: bool) -> list[Entry]:
    entries = _vae_resnet(f"{src}.mid.block_1", f"{dst}.mid_block.resnets.0", channels, channels)
    if attention:  # single-head self-attention; CompVis stores q/k/v/proj_out as 1x1 convs
        attn = f"{dst}.mid_block.attentions.0"
        entries += _norm(f"{src}.mid.attn_1.norm", f"{attn}.group_norm", channels)
        for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            entries += _affine(f"{src}.mid.attn_1.{ours}", f"{attn}.{theirs}", (channels, channels))
    return entries + _vae_resnet(f"{src}.mid.block_2", f"{dst}.mid_block.resnets.1", channels, channels)


def vae_plan(config: Mapping[str, Any]) -> list[Entry]:
    """Entries for a diffusers ``AutoencoderKL``; sources are relative to ``first_stage_model.``.

    CompVis numbers the decoder's levels from the bottom (``up.{n-1-i}`` is diffusers' ``up_blocks.{i}``).
    """
    cfg = {**_VAE_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    boc, lpb, latent = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["latent_channels"]
    n = len(boc)
    for field, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg[field]) != [kind] * n:
            raise ValueError(f"config[{field!r}] must be {n} x {kind!r}, got {list(cfg[field])}")
    attention = bool(cfg["mid_block_add_attention"])
    entries = _conv("encoder.conv_in", "encoder.conv_in", boc[0], cfg["in_channels"], 3)
    for i in range(n):
        for j in range(lpb):
            cin = boc[max(i - 1, 0)] if j == 0 else boc[i]
            entries += _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin, boc[i])
        if i < n - 1:
            entries += _conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                             boc[i], boc[i], 3)  # fmt: skip
    entries += _vae_mid("encoder", "encoder", boc[-1], attention)
    entries += _norm("encoder.norm_out", "encoder.conv_norm_out", boc[-1])
    entries += _conv("encoder.conv_out", "encoder.conv_out", 2 * latent, boc[-1], 3)
    entries += _conv("decoder.conv_in", "decoder.conv_in", boc[-1], latent, 3)
    entries += _vae_mid("decoder", "decoder", boc[-1], attention)
    rev = boc[::-1]
    for i in range(n):
        src, dst = f"decoder.up.{n - 1 - i}", f"decoder.up_blocks.{i}"
        for j in range(lpb + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
            entries += _vae_resnet(f"{src}.block.{j}", f"{dst}.resnets.{j}", cin, rev[i])
        if i < n - 1:
            entries += _conv(f"{src}.upsample.conv", f"{dst}.upsamplers.0.conv", rev[i], rev[i], 3)
    entries += _norm("decoder.norm_out", "decoder.conv_norm_out", boc[0])
    entries += _conv("decoder.conv_out", "decoder.conv_out", cfg["out_channels"], boc[0], 3)
    if cfg["use_quant_conv"]:
        entries += _conv("quant_conv", "quant_conv", 2 * latent, 2 * latent, 1)
    if cfg["use_post_quant_conv"]:
        entries += _conv("post_quant_conv", "post_quant_conv", latent, latent, 1)
    return entries


# ----------------------------------------------------------------------------- CLIP text encoders

_CLIP_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")


def _clip_dims(config: Mapping[str, Any]) -> tuple[int, ...]:
    missing = [name for name in _CLIP_FIELDS if not isinstance(config.get(name), int)]
    if missing:
        raise ValueError(f"config: a CLIPTextConfig needs integer fields {missing} (got {dict(config)})")
    return tuple(config[name] for name in _CLIP_FIELDS)


# transformers name -> checkpoint name, for the parts of a layer after q/k/v.
_HF_LAYER = {n: n for n in ("self_attn.out_proj", "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "layer_norm1": "ln_1", "layer_norm2": "ln_2"}  # fmt: skip


def _clip_layer_rest(src: str, dst: str, names: Mapping[str, str], d: int, inner: int) -> list[Entry]:
    """Output projection, MLP and the two layer norms of one encoder layer."""
    shapes = {"self_attn.out_proj": (d, d), "mlp.fc1": (inner, d), "mlp.fc2": (d, inner)}
    shapes |= {"layer_norm1": (d,), "layer_norm2": (d,)}
    return [e for ours, shape in shapes.items() for e in _affine(f"{src}.{names[ours]}", f"{dst}.{ours}", shape)]


def clip_plan(config: Mapping[str, Any]) -> list[Entry]:
    """Entries for transformers 5's ``CLIPTextModel`` from an SD 1.x checkpoint (HF names already).

    Sources are relative to ``cond_stage_model.transformer.text_model.``; targets carry no
    ``text_model.`` prefix (transformers 5's in-memory names).
    """
    vocab, d, inner, layers, positions = _clip_dims(config)
    entries = [
        Entry("embeddings.token_embedding.weight", "embeddings.token_embedding.weight", (vocab, d)),
        Entry("embeddings.position_embedding.weight", "embeddings.position_embedding.weight", (positions, d)),
    ]
    for i in range(layers):
        name = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            entries += _affine(f"{name}.self_attn.{proj}", f"{name}.self_attn.{proj}", (d, d))
        entries += _clip_layer_rest(name, name, _HF_LAYER, d, inner)
    return entries + _norm("final_layer_norm", "final_layer_norm", d)


def open_clip_plan(config: Mapping[str, Any], projection: bool = False) -> list[Entry]:
    """Entries for transformers 5's ``CLIPTextModel`` from an OpenCLIP text tower (SD 2.x, SDXL's bigG).

    Sources are relative to the tower (``cond_stage_model.model.``, ``conditioner.embedders.N.model.``).
    The fused ``attn.in_proj_weight`` (3d, d) is split into q, k, v row blocks. Only resblocks
    ``0 .. num_hidden_layers - 1`` are read: SD 2.x conditions on the penultimate layer, so its diffusers
    text encoder has 23 of the 24 layers. ``projection=True``: a ``CLIPTextModelWithProjection`` (SDXL's
    second encoder), whose targets sit under ``text_model.`` beside ``text_projection.weight``, read
    transposed from OpenCLIP's (width, projection_dim) ``text_projection`` matrix.
    """
    vocab, d, inner, layers, positions = _clip_dims(config)
    if projection and not isinstance(config.get("projection_dim"), int):
        raise ValueError(
            f"config: a CLIPTextModelWithProjection needs an integer 'projection_dim' (got {dict(config)})"
        )
    entries = [
        Entry("token_embedding.weight", "embeddings.token_embedding.weight", (vocab, d)),
        Entry("positional_embedding", "embeddings.position_embedding.weight", (positions, d)),
    ]
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            entries.append(Entry(f"{src}.attn.in_proj_weight", f"{dst}.self_attn.{proj}.weight", (d, d), (index, 3)))
            entries.append(Entry(f"{src}.attn.in_proj_bias", f"{dst}.self_attn.{proj}.bias", (d,), (index, 3)))
        entries += _clip_layer_rest(src, dst, _OPEN_CLIP_LAYER, d, inner)
    entries += _norm("ln_final", "final_layer_norm", d)
    if not projection:
        return entries
    entries = [Entry(e.source, f"text_model.{e.target}", e.shape, e.part) for e in entries]
    return [*entries, Entry("text_projection", "text_projection.weight", (config["projection_dim"], d), None, True)]
