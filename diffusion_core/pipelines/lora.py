"""LoRA adapters on a pipeline, written once: loading, adapter bookkeeping, weights, fusing (diffusers' API).

``LoraLoaderMixin`` keeps every loaded adapter in the canonical form of ``diffusion_core.weights.lora``
and tells the backend, per component, what each layer carries. All adapters on a layer travel as one stacked
pair: ``down`` (R, in[, kh, kw]) and ``up`` (out, R[, 1, 1]) with the ranks of the adapters side by side
(R = their sum, in load order), and one scale per rank column: ``adapter weight * alpha / rank`` for active,
unfused adapters, 0 otherwise. The layer adds ``up @ (scale * (down @ x))``. So ``set_adapters`` only changes
the column scales (the Flax program takes them as inputs: no recompilation), and fusing adds
``lora_scale * sum(weight * delta)`` to the base weights, remembered so ``unfuse_lora`` takes it back off.

A backend supplies four hooks (``_lora_targets``, ``_lora_install``, ``_lora_set_scales``,
``_lora_add_weights``); see their docstrings.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.weights.lora import LoraLayer, load_lora, save_lora

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # components a LoRA file may address


@dataclass(frozen=True, eq=False)
class LoraPack:
    """All adapters of one layer, stacked (see the module docstring); ``scales`` is (R,) float32."""

    down: np.ndarray  # (R, in) or (R, in, kh, kw)
    up: np.ndarray  # (out, R) or (out, R, 1, 1)
    scales: np.ndarray  # (R,)


@dataclass
class LoraAdapters:
    """The adapters of one pipeline: their layers, which are active with what weight, what is fused."""

    layers: dict[str, dict[str, dict[str, LoraLayer]]] = field(default_factory=dict)  # name -> component -> path
    weights: dict[str, float] = field(default_factory=dict)  # active adapter -> weight, in set_adapters order
    fused: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # component -> path -> delta added
    fused_names: tuple[str, ...] = ()

    def on_layer(self, component: str, path: str) -> list[tuple[str, LoraLayer]]:
        """``(adapter, layer)`` of every adapter on the layer, in load order."""
        return [
            (name, comps[component][path]) for name, comps in self.layers.items() if path in comps.get(component, {})
        ]

    def paths(self, component: str) -> list[str]:
        return sorted({p for comps in self.layers.values() for p in comps.get(component, {})})

    def column_scales(self, component: str, path: str) -> np.ndarray:
        """(R,) scale per rank column: weight * alpha / rank of active unfused adapters, else 0."""
        parts = []
        for name, layer in self.on_layer(component, path):
            live = name in self.weights and name not in self.fused_names
            parts.append(np.full(layer.rank, self.weights[name] * layer.scale if live else 0.0, np.float32))
        return np.concatenate(parts)

    def pack(self, component: str, path: str) -> LoraPack:
        layers = [layer for _, layer in self.on_layer(component, path)]
        down = np.concatenate([np.asarray(x.down, np.float32) for x in layers], axis=0)
        up = np.concatenate([np.asarray(x.up, np.float32) for x in layers], axis=1)
        return LoraPack(down, up, self.column_scales(component, path))


def _check_names(names: Any, known: Sequence[str], argument: str) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{argument} must be an adapter name or a list of names, got {names!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{argument}: no adapter(s) {unknown}; loaded: {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{argument}: names repeat in {names}")
    return list(names)


def _check_weights(weights: Any, count: int) -> list[float]:
    if weights is None or isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights] * count
    if not isinstance(weights, (list, tuple)) or len(weights) != count:
        raise ValueError(f"adapter_weights must be a number, None or a list of {count} numbers/None, got {weights!r}")
    out = []
    for w in weights:
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w)):
            raise ValueError(f"adapter_weights: each weight must be a finite number or None, got {w!r}")
        out.append(1.0 if w is None else float(w))
    return out


class LoraLoaderMixin(abc.ABC):
    """diffusers' LoRA methods for a pipeline with ``unet`` / ``text_encoder`` / ``text_encoder_2`` components.

    Abstract: each backend's ``DiffusionPipeline`` supplies the four layer hooks.
    """

    @property
    def _adapters(self) -> LoraAdapters:
        return self.__dict__.setdefault("_lora_adapters", LoraAdapters())

    # --- backend hooks ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _lora_targets(self, component: str) -> dict[str, tuple[int, ...]]:
        """``{module path: weight shape in PyTorch layout}`` of the component's Linear / Conv2d layers."""

    @abc.abstractmethod
    def _lora_install(self, component: str, packs: Mapping[str, LoraPack]) -> None:
        """Make exactly the layers in ``packs`` carry their pack (other layers of the component carry none)."""

    @abc.abstractmethod
    def _lora_set_scales(self, component: str, scales: Mapping[str, np.ndarray]) -> None:
        """New column scales for layers already installed with packs of the same shapes."""

    @abc.abstractmethod
    def _lora_add_weights(self, component: str, deltas: Mapping[str, np.ndarray]) -> None:
        """Add each (PyTorch-layout) delta to its layer's weight."""

    # --- the public API ------------------------------------------------------------------------------

    def _lora_components(self) -> list[str]:
        return [c for c in LORA_COMPONENTS if c in self._components and getattr(self, c, None) is not None]

    def lora_structure(self) -> tuple:
        """The installed LoRA layers (component, path, stacked rank): part of a compiled program's key."""
        adapters = self._adapters
        return tuple(
            (c, p, sum(x.rank for _, x in adapters.on_layer(c, p))) for c in LORA_COMPONENTS for p in adapters.paths(c)
        )

    def _reinstall(self) -> None:
        for component in self._lora_components():
            self._lora_install(
                component, {p: self._adapters.pack(component, p) for p in self._adapters.paths(component)}
            )

    def _refresh_scales(self) -> None:
        adapters = self._adapters
        for component in self._lora_components():
            self._lora_set_scales(
                component, {p: adapters.column_scales(component, p) for p in adapters.paths(component)}
            )

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, Any],
        weight_name: str | None = None,
        adapter_name: str | None = None,
        **hub: Any,
    ) -> None:
        """Load a LoRA (PEFT or kohya safetensors: a file, a folder, a Hub repo id, or a state dict) as a new adapter.

        As in diffusers, the new adapter becomes the only active one (weight 1.0; ``set_adapters`` combines
        several). Adapters fused before stay fused. ``adapter_name`` defaults to
        ``"default_<n>"``. ``hub``: ``revision``, ``local_files_only``.
        """
        adapters = self._adapters
        if adapter_name is None:
            adapter_name = f"default_{len(adapters.layers)}"
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str or None, got {adapter_name!r}")
        if adapter_name in adapters.layers:
            raise ValueError(f"adapter_name: {adapter_name!r} is already loaded; loaded: {list(adapters.layers)}")
        unknown = sorted(set(hub) - {"revision", "local_files_only"})
        if unknown:
            raise ValueError(f"load_lora_weights: unknown argument(s) {unknown}; accepted: revision, local_files_only")
        targets = {c: self._lora_targets(c) for c in self._lora_components()}
        adapters.layers[adapter_name] = load_lora(pretrained_model_name_or_path_or_dict, targets, weight_name, **hub)
        adapters.weights = {adapter_name: 1.0}
        self._reinstall()

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        """Make exactly ``adapter_names`` active, with ``adapter_weights`` (a number, or one per name; None: 1.0)."""
        adapters = self._adapters
        names = _check_names(adapter_names, list(adapters.layers), "adapter_names")
        weights = _check_weights(adapter_weights, len(names))
        if adapters.fused_names:
            raise ValueError(f"set_adapters: adapters {list(adapters.fused_names)} are fused; call unfuse_lora() first")
        adapters.weights = dict(zip(names, weights, strict=True))
        self._refresh_scales()

    def get_active_adapters(self) -> list[str]:
        """The active adapters' names."""
        return list(self._adapters.weights)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names on it]}``."""
        out: dict[str, list[str]] = {}
        for name, comps in self._adapters.layers.items():
            for component in comps:
                out.setdefault(component, []).append(name)
        return out

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Add ``lora_scale * weight * delta`` of the active adapters (or ``adapter_names``) into the base weights."""
        adapters = self._adapters
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)) or not np.isfinite(lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
        if adapters.fused_names:
            raise ValueError(f"fuse_lora: adapters {list(adapters.fused_names)} are fused already; unfuse_lora() first")
        active = list(adapters.weights)
        names = active if adapter_names is None else _check_names(adapter_names, active, "adapter_names (active)")
        if not names:
            raise ValueError("fuse_lora: no active adapter to fuse; load_lora_weights or set_adapters first")
        for component in self._lora_components():
            deltas = {}
            for path in adapters.paths(component):
                parts = [
                    adapters.weights[n] * x.delta_weight() for n, x in adapters.on_layer(component, path) if n in names
                ]
                if parts:
                    deltas[path] = float(lora_scale) * np.sum(parts, axis=0)
            self._lora_add_weights(component, deltas)
            adapters.fused[component] = deltas
        adapters.fused_names = tuple(names)
        self._refresh_scales()

    def unfuse_lora(self) -> None:
        """Take what ``fuse_lora`` added back off the base weights; the adapters apply unfused again."""
        adapters = self._adapters
        if not adapters.fused_names:
            raise ValueError("unfuse_lora: nothing is fused")
        for component, deltas in adapters.fused.items():
            self._lora_add_weights(component, {p: -d for p, d in deltas.items()})
        adapters.fused, adapters.fused_names = {}, ()
        self._refresh_scales()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove the named (unfused) adapters."""
        adapters = self._adapters
        names = _check_names(adapter_names, list(adapters.layers), "adapter_names")
        if set(names) & set(adapters.fused_names):
            raise ValueError(f"delete_adapters: {sorted(set(names) & set(adapters.fused_names))} are fused")
        for name in names:
            del adapters.layers[name]
            adapters.weights.pop(name, None)
        self._reinstall()

    def save_lora_adapter(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, weight_name: str | None = None
    ) -> Path:
        """Write a loaded adapter (any format it came in) in diffusers/PEFT form, which diffusers'
        ``load_lora_weights`` reads; ``adapter_name`` may be left out when one adapter is loaded. Returns the file."""
        loaded = list(self._adapters.layers)
        if adapter_name is None and len(loaded) != 1:
            raise ValueError(f"adapter_name: name one of the loaded adapters {loaded}")
        (name,) = _check_names(loaded[0] if adapter_name is None else adapter_name, loaded, "adapter_name")
        return save_lora(save_directory, self._adapters.layers[name], weight_name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter. Fused weights stay in the base weights (diffusers: fuse, then unload to keep)."""
        self.__dict__["_lora_adapters"] = LoraAdapters()
        self._reinstall()
