"""The torch half of LoRA: a layer's stacked low-rank pair as a forward hook on its ``nn.Linear`` / ``nn.Conv2d``.

The bookkeeping (files, adapters, weights, fusing) is ``diffusion_core.pipelines.lora``. Here each layer that
carries adapters gets a child ``lora`` (:class:`LoraDelta`, non-persistent buffers: the state dict and
``save_pretrained`` stay the base model's, ``.to()`` moves it) and a forward hook adding ``up(scales * down(x))``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.pipelines.lora import LoraLoaderMixin, LoraPack

_LORA_CHILD = "lora"


class LoraDelta(nn.Module):
    """The stacked adapters of one layer: ``down`` (R, in[, kh, kw]), ``up`` (out, R[, 1, 1]), ``scales`` (R,)."""

    def __init__(self, pack: LoraPack, like: torch.Tensor) -> None:
        super().__init__()
        for name in ("down", "up", "scales"):
            tensor = torch.from_numpy(np.ascontiguousarray(getattr(pack, name)))
            self.register_buffer(name, tensor.to(device=like.device, dtype=like.dtype), persistent=False)
        self.live = bool(np.any(pack.scales))  # all scales 0 (fused or inactive adapters): the hook adds nothing

    def make_trainable(self) -> None:
        """Turn ``down`` and ``up`` into trainable parameters (LoRA training); ``scales`` stay a fixed buffer."""
        for name in ("down", "up"):
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name).clone()))

    def set_scales(self, scales: np.ndarray) -> None:
        self.scales.copy_(torch.from_numpy(scales))
        self.live = bool(np.any(scales))

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.dtype)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, self.down, None, layer.stride, layer.padding, layer.dilation)  # (B, R, H', W')
            return F.conv2d(h * self.scales[:, None, None], self.up)  # (B, out, H', W')
        return F.linear(F.linear(x, self.down) * self.scales, self.up)  # (..., out)


def _add_delta(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    lora = getattr(layer, _LORA_CHILD)
    return output + lora(layer, args[0]).to(output.dtype) if lora.live else output


def lora_targets(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of every Linear / Conv2d of ``model`` (groups of 1)."""
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    }


def install(model: nn.Module, packs: Mapping[str, LoraPack], hooks: dict[str, torch.utils.hooks.RemovableHandle]):
    """Make exactly the layers in ``packs`` carry them; ``hooks`` (path -> handle) is updated in place."""
    for path in list(hooks):
        layer = model.get_submodule(path)
        hooks.pop(path).remove()
        delattr(layer, _LORA_CHILD)
    for path, pack in packs.items():
        layer = model.get_submodule(path)
        layer.add_module(_LORA_CHILD, LoraDelta(pack, layer.weight))
        hooks[path] = layer.register_forward_hook(_add_delta)


def lora_deltas(model: nn.Module) -> dict[str, LoraDelta]:
    """``{layer path: its LoraDelta}`` of the layers of ``model`` that carry adapters."""
    return {
        name: getattr(m, _LORA_CHILD)
        for name, m in model.named_modules()
        if isinstance(getattr(m, _LORA_CHILD, None), LoraDelta)
    }


class TorchLoraLayers(LoraLoaderMixin):
    """The torch hooks of ``LoraLoaderMixin``."""

    def _lora_hooks(self, component: str) -> dict[str, torch.utils.hooks.RemovableHandle]:
        return self.__dict__.setdefault("_lora_hook_handles", {}).setdefault(component, {})

    def _lora_targets(self, component: str) -> dict[str, tuple[int, ...]]:
        return lora_targets(getattr(self, component))

    def _lora_install(self, component: str, packs: Mapping[str, LoraPack]) -> None:
        install(getattr(self, component), packs, self._lora_hooks(component))

    def _lora_set_scales(self, component: str, scales: Mapping[str, np.ndarray]) -> None:
        model = getattr(self, component)
        for path, values in scales.items():
            getattr(model.get_submodule(path), _LORA_CHILD).set_scales(values)

    def _lora_add_weights(self, component: str, deltas: Mapping[str, np.ndarray]) -> None:
        model = getattr(self, component)
        with torch.no_grad():
            for path, delta in deltas.items():
                weight = model.get_submodule(path).weight
                weight += torch.from_numpy(np.ascontiguousarray(delta)).to(weight.device, weight.dtype)
