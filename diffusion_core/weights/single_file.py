"""Loading original CompVis / Stable Diffusion 1.x-2.x and SGM SDXL single-file checkpoints as diffusers state dicts.

One ``.safetensors`` (or, with ``allow_pickle=True``, ``.ckpt``) holds the whole pipeline:
``model.diffusion_model.*`` (UNet; SDXL's ``label_emb`` is its ``add_embedding``), ``first_stage_model.*``
or ``vae.*`` (VAE), ``cond_stage_model.transformer.*`` (SD 1.x CLIP, already in Hugging Face names) or
``cond_stage_model.model.*`` (SD 2.x OpenCLIP); SDXL: ``conditioner.embedders.0.transformer.*`` (CLIP-L,
``text_encoder``) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG, ``text_encoder_2``; the refiner's
is ``conditioner.embedders.0.model.*``). ``iter_single_file`` yields one component's
tensors under diffusers / transformers 5 names and layouts, one at a time from the
memory-mapped file; ``single_file_infos`` gives the same keys and shapes from the header;
``open_single_file`` does the header check once and returns both (what the models'
``from_single_file`` uses, through ``pretrained.CheckpointLayout.open_single_file``).

No default configs are bundled (this library does not download): the caller passes the
component's config (a dict, a ``config.json`` or a folder holding one, e.g. a diffusers
pipeline's ``unet/``), which fixes the key plan and every expected shape.

Strictness: every key the config implies must be present with a matching shape, and every key
under the component's prefix must be used; otherwise a ValueError lists the problems before any
tensor is read. Deliberately ignored: keys outside the component's prefix (other components,
``model_ema.*`` unless EMA weights are asked for, ``alphas_cumprod``, ``betas``, ``lvlb_weights``
and the other schedule buffers), the CLIP ``position_ids`` buffer, and OpenCLIP's
``text_projection`` (read only for ``text_encoder_2``), ``logit_scale``, ``attn_mask``, image tower
(``visual.*``) and the resblocks past ``num_hidden_layers`` (SD 2.x uses the penultimate layer).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from diffusion_core.configuration import read_json_config
from diffusion_core.weights.io import (
    FRAMEWORKS,
    TensorInfo,
    capped,
    cast_tensor,
    file_infos,
    from_torch,
    numpy_dtype,
    read_pickle_state_dict,
)
from diffusion_core.weights.single_file_keys import Entry, Shape
from diffusion_core.weights.single_file_layouts import UNET_PREFIX, Layout, component_layout

COMPONENTS = ("unet", "vae", "text_encoder")  # an SD 1.x/2.x file's parts
ALL_COMPONENTS = (*COMPONENTS, "text_encoder_2")  # every part this module reads
FAMILY_COMPONENTS = {  # the parts of SDXL files; other families hold COMPONENTS
    "xl_base": ALL_COMPONENTS,
    "xl_inpaint": ALL_COMPONENTS,
    "xl_refiner": ("unet", "vae", "text_encoder_2"),
}
# The component each class reads from a single file (``pretrained.SingleFileModel``'s default).
SINGLE_FILE_COMPONENTS = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
MIN_EMA_KEYS = 100  # as diffusers: EMA weights count as present when more than this many keys exist
PROBES = {  # key probes, as diffusers' single-file loader uses them
    "v1": "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "v2": "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "conv_in": "model.diffusion_model.input_blocks.0.0.weight",
    "upscale": "model.diffusion_model.input_blocks.10.0.skip_connection.bias",
    "controlnet": "control_model.time_embed.0.weight",
    "xl_base": "conditioner.embedders.1.model.positional_embedding",  # SDXL base: OpenCLIP bigG second
    "xl_refiner": "conditioner.embedders.0.model.positional_embedding",  # SDXL refiner: bigG only
}


def _shape(info: Any) -> Shape:
    return tuple(int(d) for d in (info[1] if isinstance(info, tuple) and isinstance(info[0], str) else info))


def _root(keys: Mapping[str, Any]) -> str:
    """``"state_dict."`` for checkpoints flattened from a Lightning ``{"state_dict": ...}``, else ``""``."""
    if not any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith("state_dict.") for k in keys):
        return "state_dict."
    return ""


def detect_model_type(infos: Mapping[str, Any] | str | os.PathLike) -> str:
    """The checkpoint family from key probes: ``"v1"``, ``"v2"``, ``"inpainting"``, ``"inpainting_v2"``,
    ``"pix2pix"``, ``"upscale"``, ``"controlnet"``, ``"xl_base"``, ``"xl_refiner"`` or ``"xl_inpaint"``.

    ``infos`` maps keys to shapes or ``(dtype, shape)`` pairs (``file_infos``), or is a checkpoint path.
    """
    if not isinstance(infos, Mapping):
        infos = _read_infos(Path(infos), allow_pickle=False)
    root = _root(infos)
    infos = {k[len(root) :]: v for k, v in infos.items() if k.startswith(root)}

    def width(probe: str, axis: int) -> int | None:
        key = PROBES[probe]
        return _shape(infos[key])[axis] if key in infos and len(_shape(infos[key])) > abs(axis) else None

    is_v2 = width("v2", -1) == 1024
    if PROBES["controlnet"] in infos:
        return "controlnet"
    for family in ("xl_base", "xl_refiner"):
        if PROBES[family] in infos:
            return "xl_inpaint" if family == "xl_base" and width("conv_in", 1) == 9 else family
    if width("conv_in", 1) == 9:
        return "inpainting_v2" if is_v2 else "inpainting"
    if width("conv_in", 1) == 8:
        return "pix2pix"
    if is_v2:
        return "v2"
    if PROBES["upscale"] in infos:
        return "upscale"
    if any(k.startswith(UNET_PREFIX) for k in infos):
        return "v1"
    raise ValueError(
        f"infos: not a CompVis / Stable Diffusion checkpoint (no key starts with {UNET_PREFIX!r} "
        f"or {PROBES['controlnet']!r}); first keys: {sorted(infos)[:5]}"
    )


def file_components(infos: Mapping[str, Any] | str | os.PathLike, allow_pickle: bool = False) -> tuple[str, ...]:
    """The components a checkpoint holds, by its family (:func:`detect_model_type`): SDXL base
    ``unet, vae, text_encoder, text_encoder_2``, refiner ``unet, vae, text_encoder_2``, else ``COMPONENTS``.
    ``allow_pickle``: a ``.ckpt`` path may be read (weights only) to find out."""
    if not isinstance(infos, Mapping):
        infos = _read_infos(Path(infos), allow_pickle)
    return FAMILY_COMPONENTS.get(detect_model_type(infos), COMPONENTS)


# ----------------------------------------------------------------------------- reading


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _read_infos(path: Path, allow_pickle: bool) -> dict[str, TensorInfo]:
    if not path.is_file():
        raise FileNotFoundError(f"path: no such checkpoint file {str(path)!r}")
    if not _is_pickle(path):
        return file_infos(path)
    if not allow_pickle:
        raise ValueError(
            f"path: {str(path)!r} is a pickle checkpoint; pass allow_pickle=True to read it "
            "(loaded with torch.load(weights_only=True)) or convert it to .safetensors"
        )
    return file_infos(path, is_pickle=True, unwrap_lightning=True)


def _ema_key(prefix: str, relative: str) -> str:
    """LDM's EMA name: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``."""
    root = prefix[: -len(UNET_PREFIX)]
    return f"{root}{EMA_PREFIX}" + f"diffusion_model.{relative}".replace(".", "")


def _sources(layout: Layout, keys: Mapping[str, Any], component: str, extract_ema: bool) -> dict[str, str]:
    """``{relative source key: key read from the file}`` (the EMA copy when asked for and present)."""
    relatives = dict.fromkeys(e.source for e in layout.entries)
    if not extract_ema or component != "unet":
        return {rel: layout.prefix + rel for rel in relatives}
    root = layout.prefix[: -len(UNET_PREFIX)]
    if sum(k.startswith(root + EMA_PREFIX) for k in keys) <= MIN_EMA_KEYS:
        warnings.warn(
            "extract_ema=True but the checkpoint holds no EMA weights; loading the regular weights", stacklevel=4
        )
        return {rel: layout.prefix + rel for rel in relatives}
    return {rel: _ema_key(layout.prefix, rel) for rel in relatives}


def _fitted(shape: Shape, entry: Entry) -> Shape | None:
    """The shape ``entry`` gets from a source of ``shape`` (row block, then 1x1 conv <-> linear), or None."""
    if entry.part is not None:
        count = entry.part[1]
        if not shape or shape[0] % count:
            return None
        shape = (shape[0] // count, *shape[1:])
    if entry.transpose:
        shape = shape[::-1] if len(shape) == 2 else ()
    if shape == entry.shape:
        return shape

    def as_linear(s: Shape) -> Shape:
        return s[:2] if len(s) == 4 and s[2:] == (1, 1) else s

    if {len(shape), len(entry.shape)} == {2, 4} and as_linear(shape) == as_linear(entry.shape):
        return entry.shape
    return None


def _check(layout: Layout, infos: Mapping[str, TensorInfo], sources: Mapping[str, str], component: str) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and shape mismatches (CompVis names)."""
    missing, mismatched = [], []
    for entry in layout.entries:
        key = sources[entry.source]
        if key not in infos:
            missing.append(f"{key} (-> {entry.target})")
        elif _fitted(_shape(infos[key]), entry) is None:
            part = "" if entry.part is None else f" rows {entry.part[0] + 1}/{entry.part[1]}"
            mismatched.append(f"{key}{part} -> {entry.target}: expected {entry.shape}, got {_shape(infos[key])}")
    used = {layout.prefix + e.source for e in layout.entries}
    unexpected = sorted(
        k
        for k in infos
        if k.startswith(layout.prefix) and k not in used and not layout.ignored(k[len(layout.prefix) :])
    )
    problems = [
        f"{label} {capped(sorted(dict.fromkeys(items)), 20)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"single-file checkpoint does not match the {component} config (prefix {layout.prefix!r}): "
            + "; ".join(problems)
        )


def read_component_config(
    config: Mapping[str, Any] | str | os.PathLike, subfolder: str | None = None
) -> dict[str, Any]:
    """A component's config from a dict, a ``config.json``, or a folder holding one (``subfolder`` inside it)."""
    if isinstance(config, Mapping):
        if subfolder is not None:
            raise ValueError("subfolder: only applies when config is a folder, not a dict")
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        if subfolder is not None and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
            raise ValueError(f"subfolder must be a relative folder name, got {subfolder!r}")
        return read_json_config(config, "config.json", subfolder=subfolder)
    raise ValueError(f"config: expected a dict, a config.json path or a folder holding one, got {type(config)}")


@dataclass(frozen=True)
class SingleFileComponent:
    """One component of a checkpoint, validated from the header: its diffusers keys and how to stream them."""

    path: Path
    component: str
    entries: list[Entry]
    sources: dict[str, str]  # relative CompVis key -> key read from the file
    infos: dict[str, TensorInfo]  # diffusers key -> (dtype name, converted shape)

    def tensors(self, framework: str = "numpy", dtype: Any = None) -> Iterator[tuple[str, Any]]:
        """Yield ``(diffusers key, tensor)`` one at a time, reshaped to the diffusers layout and cast to ``dtype``."""
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}")
        target = None if dtype is None else numpy_dtype(dtype)
        return _generate(self.path, self.entries, self.sources, FRAMEWORKS[framework], target)


def open_single_file(
    path: str | os.PathLike,
    component: str,
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    extract_ema: bool = False,
    allow_pickle: bool = False,
) -> SingleFileComponent:
    """Validate one component of a single-file checkpoint from its header; nothing but the header is read.

    Raises ValueError listing missing, unexpected and mis-shaped keys (see :func:`single_file_infos`).
    """
    if component not in ALL_COMPONENTS:
        raise ValueError(f"component must be one of {list(ALL_COMPONENTS)}, got {component!r}")
    for name, flag in (("extract_ema", extract_ema), ("allow_pickle", allow_pickle)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    path = Path(path)
    infos = _read_infos(path, allow_pickle)
    layout = component_layout(infos, _root(infos), component, read_component_config(config))
    sources = _sources(layout, infos, component, extract_ema)
    _check(layout, infos, sources, component)
    converted = {e.target: (infos[sources[e.source]][0], e.shape) for e in layout.entries}
    return SingleFileComponent(path, component, layout.entries, sources, converted)


def single_file_infos(
    path: str | os.PathLike,
    component: str,
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    extract_ema: bool = False,
    allow_pickle: bool = False,
) -> dict[str, TensorInfo]:
    """``{diffusers key: (dtype name, shape)}`` of one component, from the file header only.

    Shapes are the converted ones (VAE attention 1x1 convs as linear layers, OpenCLIP's fused
    q/k/v split, ``proj_in``/``proj_out`` as ``use_linear_projection`` asks). ``component`` is
    ``"unet"``, ``"vae"``, ``"text_encoder"`` or ``"text_encoder_2"`` (SDXL's bigG); ``config`` is that component's
    diffusers ``config.json`` (transformers' ``CLIPTextConfig`` for the text encoders) as a dict or a path.
    Raises ValueError listing missing, unexpected and mis-shaped keys.
    """
    return open_single_file(path, component, config, extract_ema=extract_ema, allow_pickle=allow_pickle).infos


def iter_single_file(
    path: str | os.PathLike,
    component: str,
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    framework: str = "numpy",
    dtype: Any = None,
    extract_ema: bool = False,
    allow_pickle: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(diffusers key, tensor)`` of one component, one tensor at a time.

    The whole checkpoint is validated from its header first (same rules and errors as
    :func:`single_file_infos`); then each tensor is read from the memory-mapped file only when
    yielded (OpenCLIP's q, k and v as row slices), reshaped to the diffusers layout and cast to
    ``dtype`` if given. ``framework`` is ``"numpy"``, ``"pt"`` or ``"flax"``. ``extract_ema=True``
    reads the UNet from LDM's ``model_ema.*`` copy when the checkpoint has one (a warning
    otherwise). Pickle checkpoints (``.ckpt``) need ``allow_pickle=True`` and torch.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}")
    found = open_single_file(path, component, config, extract_ema=extract_ema, allow_pickle=allow_pickle)
    return found.tensors(framework, dtype)


def _block(entry: Entry, rows: int) -> slice:
    if entry.part is None:
        return slice(None)
    size = rows // entry.part[1]
    return slice(entry.part[0] * size, (entry.part[0] + 1) * size)


def _arranged(tensor: Any, entry: Entry, framework: str) -> Any:
    """``tensor`` in the target layout: transposed (contiguous) when ``entry.transpose``, else reshaped."""
    if not entry.transpose:
        return tensor.reshape(entry.shape)
    return tensor.T.contiguous() if framework == "pt" else tensor.T.copy()


def _generate(path: Path, entries: list[Entry], sources: Mapping[str, str], framework: str, target: Any):
    if _is_pickle(path):
        state = read_pickle_state_dict(path, unwrap_lightning=True)
        for entry in entries:
            tensor = state[sources[entry.source]]
            tensor = from_torch(tensor[_block(entry, tensor.shape[0])], framework)
            yield entry.target, cast_tensor(_arranged(tensor, entry, framework), target, framework)
        return
    with safe_open(path, framework=framework) as f:
        for entry in entries:
            key = sources[entry.source]
            if entry.part is None:
                tensor = f.get_tensor(key)
            else:
                view = f.get_slice(key)
                tensor = view[_block(entry, view.get_shape()[0])]
            yield entry.target, cast_tensor(_arranged(tensor, entry, framework), target, framework)


def load_single_file(
    path: str | os.PathLike, component: str, config: Mapping[str, Any] | str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """One component as a ``{diffusers key: tensor}`` dict; same arguments as :func:`iter_single_file`."""
    return dict(iter_single_file(path, component, config, **kwargs))
