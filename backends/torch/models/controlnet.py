"""PyTorch ``ControlNetModel`` (Zhang et al. 2023): a trainable copy of the UNet encoder steered by an image.

Config fields, module names and state-dict keys are those of diffusers 0.42.1. The call returns
``(down_block_res_samples, mid_block_res_sample)``, ready for ``UNet2DConditionModel``'s
``down_block_additional_residuals`` / ``mid_block_additional_residual``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.configuration import FrozenConfig
from diffusion_core.models import unet_condition_config as ucc
from diffusion_core.models.attention import AttentionContext, attention_mask_bias
from diffusion_core.torch.models.embeddings import build_add_embedding, embed_addition
from diffusion_core.torch.models.modeling import PretrainedMixin
from diffusion_core.torch.models.unet_2d_condition import (
    UNet2DConditionModel,
    batch_timesteps,
    build_stem,
    embed_time,
    encode_context,
    run_down,
    run_mid,
)
from diffusion_core.torch.models.unet_2d_condition_blocks import build_down_block, build_mid_block

# UNet config fields a ControlNet copies in ``from_unet`` (diffusers' list).
_FROM_UNET_FIELDS = (
    "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
    "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type",
)  # fmt: skip


def _zero_conv(channels: int) -> nn.Conv2d:
    """1x1 conv initialised to zero, so a fresh ControlNet leaves the UNet unchanged."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """Small conv encoder from the conditioning image to the latent grid (``conv_in``, ``blocks``, ``conv_out``)."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)


class ControlNetModel(PretrainedMixin, nn.Module):
    """ControlNet with diffusers' config and parameter names.

    Keyword arguments are diffusers' config fields; defaults in
    ``diffusion_core.models.model_config.CONTROLNET_DEFAULTS``. Unimplemented options raise ValueError.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = ucc.resolve_config(config, ucc.CONTROLNET_DEFAULTS, "ControlNetModel")
        plan = ucc.controlnet_plan(cfg)
        self.config = FrozenConfig(cfg)
        self.plan = plan
        channels = plan.block_out_channels
        build_stem(self, plan.time, plan.in_channels, channels[0], 3, plan.encoder_hid_proj)
        self.add_embedding = build_add_embedding(plan.addition)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], plan.conditioning_channels, plan.conditioning_embedding_out_channels
        )
        self.down_blocks = nn.ModuleList(build_down_block(b) for b in plan.down)
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in plan.controlnet_down_channels)
        self.controlnet_mid_block = _zero_conv(channels[-1])
        self.mid_block = build_mid_block(plan.mid)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ControlNetModel:
        """Build from a diffusers ``config.json`` mapping; ``_``-prefixed keys are ignored."""
        return cls(**ucc.controlnet_kwargs(config))

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> ControlNetModel:
        """A ControlNet shaped like ``unet``'s encoder, optionally starting from its weights (zero convs at 0)."""
        if not isinstance(unet, UNet2DConditionModel):
            raise ValueError(f"unet: expected a UNet2DConditionModel, got {type(unet).__name__}")
        config = {k: unet.config[k] for k in _FROM_UNET_FIELDS}
        controlnet = cls(
            **config,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        ).to(unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block"):
                target = getattr(controlnet, name, None)  # add_embedding: only with an addition_embed_type
                if target is not None:
                    target.load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        guess_mode: bool = False,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the UNet skips and mid block, scaled by ``conditioning_scale``.

        ``controlnet_cond``: (B, conditioning_channels, 8H, 8W) image for latents (B, C, H, W).
        ``guess_mode``: residuals scaled from 0.1 (first skip) to 1.0 (mid block), log-spaced.
        ``added_cond_kwargs``: the ``addition_embed_type`` inputs (SDXL: ``text_embeds``, ``time_ids``).
        """
        if sample.ndim != 4 or controlnet_cond.ndim != 4:
            raise ValueError("sample, controlnet_cond: expected (B, C, H, W) tensors")
        if timestep_cond is not None:
            raise ValueError("timestep_cond: ControlNetModel has no time_cond_proj_dim (diffusers' has none either)")
        if self.plan.flip_channels:
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])  # bgr -> rgb
        # diffusers' ControlNet holds encoder_hid_proj (so checkpoints load) but never applies it: neither do we.
        context = encode_context(None, encoder_hidden_states)
        ctx = AttentionContext(context, attention_mask=attention_mask_bias(attention_mask, sample))
        timesteps = batch_timesteps(timestep, sample.shape[0], sample.device)  # (B,)
        emb = embed_time(self, self.plan.time, timesteps, sample.dtype, class_labels, None)
        aug = embed_addition(self.add_embedding, self.plan.addition, context, added_cond_kwargs, emb.dtype)
        emb = emb if aug is None else emb + aug
        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        sample, skips = run_down(self.down_blocks, sample, emb, ctx)
        sample = run_mid(self.mid_block, sample, emb, ctx)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid_res = self.controlnet_mid_block(sample)
        return self._scale(down, mid_res, conditioning_scale, guess_mode)

    def _scale(
        self, down: list[torch.Tensor], mid: torch.Tensor, conditioning_scale: float | torch.Tensor, guess_mode: bool
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Apply the conditioning scale (log-ramped in guess mode) and optional global pooling."""
        guess = guess_mode and not self.plan.global_pool_conditions
        # conditioning_scale may be a tensor on the model's device (a pipeline's per-call weight): applied in torch
        factors = [float(f) * conditioning_scale for f in ucc.controlnet_residual_scales(len(down), 1.0, guess)]
        down = [s * f for s, f in zip(down, factors, strict=False)]
        mid = mid * factors[-1]
        if self.plan.global_pool_conditions:
            down = [torch.mean(s, dim=(2, 3), keepdim=True) for s in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        return tuple(down), mid
