"""LoRA files -> one canonical form: ``{component: {module path: LoraLayer(down, up, scale)}}`` (numpy only).

Two layouts are read, through one prefix table per layout (SD 1.x and SDXL names alike):

- diffusers / PEFT (``pytorch_lora_weights.safetensors``): ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``,
  ``text_encoder.`` and ``text_encoder_2.`` prefixes, optional per-layer ``<path>.alpha`` keys, and the
  ``lora_adapter_metadata`` diffusers writes (PEFT's ``LoraConfig``: ``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) packed as ``"<component>.<field>"``.
- kohya / sd-scripts: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, with
  ``lora_te_`` (SD 1.x), ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders); SDXL UNet names in the
  original layout (``lora_unet_input_blocks_4_1_...``) are renamed by ``lora_sgm``.

A module path is resolved against the model's own Linear/Conv paths (``targets``), so underscores in kohya names
are never guessed. Text-encoder paths match with or without transformers' ``text_model.`` level (published files
say ``text_encoder.text_model.encoder...``, transformers 5 writes ``text_encoder.encoder...``). The layer's update
is ``W + scale * up @ down`` (convs: ``down`` has the layer's kernel, ``up`` is 1x1), ``scale = alpha / rank``
(``alpha / sqrt(rank)`` under rsLoRA), alpha defaulting to the rank. Any key that does not land on a layer, a
half pair, or a shape that does not fit is a ValueError listing them all: never a partial load.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.weights.hub import hub_fetch, local_or_repo_id
from diffusion_core.weights.io import as_numpy, capped, read_safetensors_plain
from diffusion_core.weights.lora_sgm import layers_per_block, sgm_to_diffusers
from diffusion_core.weights.safetensors_header import read_header

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON LoraConfig per component)

# Key prefix -> pipeline component, per layout. SDXL's names are rows of the same tables.
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# Key suffix -> role of the tensor, per layout.
PEFT_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
KOHYA_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
TEXT_MODEL = "text_model."  # transformers' optional level inside a CLIP text encoder

Targets = Mapping[str, Mapping[str, tuple[int, ...]]]  # component -> {module path: torch-layout weight shape}


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One layer's low-rank update ``scale * up @ down`` in PyTorch layout.

    ``down``: (rank, in) for a Linear, (rank, in, kh, kw) for a Conv2d (the layer's own kernel, stride and padding);
    ``up``: (out, rank), or (out, rank, 1, 1) for a conv.
    """

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta_weight(self) -> np.ndarray:
        """``scale * up @ down`` shaped as the layer's weight: (out, in) or (out, in, kh, kw), float32."""
        up = self.up.reshape(self.up.shape[0], self.rank).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        return (self.scale * (up @ down)).reshape((self.up.shape[0],) + self.down.shape[1:])


@dataclass(frozen=True)
class _Entry:
    """What a key says: the layer (component, path) it belongs to and its role (down / up / alpha)."""

    component: str
    path: str
    role: str


def _split(key: str, prefixes: Mapping[str, str], roles: Mapping[str, str]) -> tuple[str, str, str] | None:
    """``(component, module name, role)`` of ``key`` in one layout, or None if it is not of that layout."""
    prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p)), None)
    suffix = next((s for s in roles if key.endswith(s)), None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    return prefixes[prefix], key[len(prefix) : -len(suffix)], roles[suffix]


def _strip_text_model(path: str, sep: str) -> str:
    level = TEXT_MODEL.replace(".", sep)
    return path[len(level) :] if path.startswith(level) else path


def _lookup(paths: Mapping[str, Any], sep: str) -> dict[str, str | None]:
    """Normalised name (no ``text_model.`` level, parts joined by ``sep``) -> module path; None where ambiguous."""
    table: dict[str, str | None] = {}
    for path in paths:
        name = _strip_text_model(path, ".").replace(".", sep)
        table[name] = path if table.get(name, path) == path else None
    return table


def _entries(keys: list[str], targets: Targets) -> tuple[dict[str, _Entry], list[str]]:
    """Each key's :class:`_Entry`, and one line per kind of key that lands on no layer of ``targets``."""
    tables = {(c, sep): _lookup(paths, sep) for c, paths in targets.items() for sep in (".", "_")}
    found, unmatched, absent = {}, [], {}
    per_block = layers_per_block(targets.get("unet", {}))
    for key in keys:
        split, sep = _split(key, PEFT_PREFIXES, PEFT_ROLES), "."
        if split is None:
            split, sep = _split(key, KOHYA_PREFIXES, KOHYA_ROLES), "_"
        if split is not None and split[0] not in targets:
            absent.setdefault(split[0], []).append(key)
            continue
        path = tables[split[0], sep].get(_strip_text_model(split[1], sep)) if split is not None else None
        if path is None and split is not None and split[0] == "unet" and sep == "_":  # SDXL kohya: sgm names
            renamed = sgm_to_diffusers(split[1], per_block)
            path = tables["unet", sep].get(renamed) if renamed else None
        if path is None:
            unmatched.append(key)
        else:
            found[key] = _Entry(split[0], path, split[2])
    lines = [f"no layer for key(s) {capped(sorted(unmatched), 20)}"] if unmatched else []
    lines += [f"the pipeline has no {c} (has {sorted(targets)}) for {capped(sorted(k), 5)}" for c, k in absent.items()]
    return found, lines


def _check_shapes(key: str, down: np.ndarray, up: np.ndarray, weight: tuple[int, ...]) -> str | None:
    """Why the pair ``down``/``up`` does not fit a layer whose weight is ``weight``, or None."""
    rank = down.shape[0] if down.ndim else 0
    conv = len(weight) == 4
    want_down = (rank, weight[1], *weight[2:]) if conv else (rank, weight[1])
    want_up = (weight[0], rank, 1, 1) if conv else (weight[0], rank)
    if rank < 1 or down.shape != want_down or up.shape != want_up:
        return f"{key}: down {down.shape}, up {up.shape} do not fit weight {weight} (want {want_down}, {want_up})"
    return None


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """The value of the first ``alpha_pattern`` key (PEFT: a module name or regex suffix) matching ``path``."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
            return value
    return None


def _config(metadata: Mapping[str, Any] | None, component: str) -> dict[str, Any]:
    """The component's PEFT LoraConfig fields from diffusers' metadata (``"unet.lora_alpha"`` -> ``lora_alpha``)."""
    prefix = f"{component}."
    return {k[len(prefix) :]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}


def _scale(path: str, rank: int, alpha: np.ndarray | None, config: Mapping[str, Any]) -> float:
    """``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``): the file's alpha key, else the metadata's, else rank."""
    if alpha is not None:
        value = float(np.asarray(alpha, np.float64).reshape(-1)[0])
    else:
        value = _pattern_value(config.get("alpha_pattern") or {}, path)
        value = float(value if value is not None else config.get("lora_alpha", rank))
    return value / (math.sqrt(rank) if config.get("use_rslora") else rank)


def parse_lora(
    tensors: Mapping[str, Any], targets: Targets, metadata: Mapping[str, Any] | None = None
) -> dict[str, dict[str, LoraLayer]]:
    """``{component: {module path: LoraLayer}}`` from a LoRA state dict in PEFT or kohya layout.

    ``targets``: the pipeline's components that take LoRA, each ``{module path: weight shape}`` (PyTorch layout)
    of its Linear and Conv2d layers. ``metadata``: diffusers' parsed ``lora_adapter_metadata`` (or None).
    ValueError listing every key that lands on no layer (unknown layout, component the pipeline lacks, DoRA
    magnitudes, ...), every layer with half a pair, and every shape mismatch.
    """
    if not tensors:
        raise ValueError("pretrained_model_name_or_path_or_dict: the LoRA state dict holds no tensors")
    for component in {c for c, _, _ in (_split(k, PEFT_PREFIXES, PEFT_ROLES) or ("", "", "") for k in tensors)}:
        if _config(metadata, component).get("use_dora"):
            raise ValueError(f"LoRA metadata: {component} is a DoRA adapter (use_dora=True); only plain LoRA is read")
    found, problems = _entries(list(tensors), targets)
    layers: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, entry in found.items():
        roles = layers.setdefault((entry.component, entry.path), {})
        if entry.role in roles:
            problems.append(
                f"{key}: {entry.component}.{entry.path} {entry.role} given twice (also {roles[entry.role][0]})"
            )
        roles[entry.role] = (key, as_numpy(tensors[key]))
    out: dict[str, dict[str, LoraLayer]] = {}
    for (component, path), roles in sorted(layers.items()):
        if "down" not in roles or "up" not in roles:
            problems.append(f"{component}.{path}: has {sorted(roles)}, needs both down and up")
            continue
        (key, down), (_, up) = roles["down"], roles["up"]
        why = _check_shapes(key, down, up, tuple(targets[component][path]))
        if why:
            problems.append(why)
            continue
        alpha = roles["alpha"][1] if "alpha" in roles else None
        scale = _scale(path, down.shape[0], alpha, _config(metadata, component))
        out.setdefault(component, {})[path] = LoraLayer(down, up, scale)
    if problems:
        raise ValueError("LoRA weights do not match the pipeline:\n  " + "\n  ".join(problems))
    return out


def _lora_file(path_or_repo: str | os.PathLike, weight_name: str | None, **hub: Any) -> Path:
    """The safetensors file: ``path_or_repo`` itself, ``weight_name`` in a folder, or fetched from a Hub repo."""
    if weight_name is not None and (not isinstance(weight_name, str) or not weight_name.endswith(".safetensors")):
        raise ValueError(f"weight_name must be a .safetensors file name or None, got {weight_name!r}")
    as_file = Path(os.fspath(path_or_repo)).expanduser()
    if as_file.is_file():
        return as_file
    found = local_or_repo_id(path_or_repo)
    if isinstance(found, Path):
        if weight_name is None:
            files = sorted(found.glob("*.safetensors"))
            named = found / LORA_WEIGHTS_NAME
            if not named.is_file() and len(files) != 1:
                raise ValueError(f"weight_name: {str(found)!r} holds {[f.name for f in files]}; name the LoRA file")
            return named if named.is_file() else files[0]
        if not (found / weight_name).is_file():
            raise FileNotFoundError(f"weight_name: no {weight_name!r} in {str(found)!r}")
        return found / weight_name
    name = weight_name or LORA_WEIGHTS_NAME

    def fetch(local_only: bool) -> str:
        import huggingface_hub

        return huggingface_hub.hf_hub_download(found, name, local_files_only=local_only, **hub)

    return hub_fetch(found, hub.get("revision"), hub.pop("local_files_only", False), fetch)


def read_lora_file(
    path_or_repo: str | os.PathLike, weight_name: str | None = None, **hub: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """``(tensors, metadata)`` of a LoRA safetensors file (a file, a folder, or a Hub repo id + ``weight_name``).

    ``metadata`` is diffusers' ``lora_adapter_metadata`` parsed from JSON, or None. ``hub``: ``revision``,
    ``local_files_only``.
    """
    path = _lora_file(path_or_repo, weight_name, **hub)
    raw = read_header(path).metadata.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: {METADATA_KEY} is not valid JSON ({e})") from None
    return dict(read_safetensors_plain(path)), metadata


def load_lora(
    source: str | os.PathLike | Mapping[str, Any], targets: Targets, weight_name: str | None = None, **hub: Any
) -> dict[str, dict[str, LoraLayer]]:
    """:func:`parse_lora` of a file, folder or Hub repo (see :func:`read_lora_file`), or of a state dict."""
    if isinstance(source, Mapping):
        return parse_lora(source, targets)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            "pretrained_model_name_or_path_or_dict must be a path, Hub repo id or state dict, "
            f"got {type(source).__name__}"
        )
    tensors, metadata = read_lora_file(source, weight_name, **hub)
    return parse_lora(tensors, targets, metadata)


def _most_common(values: dict[str, float]) -> float:
    counts: dict[float, int] = {}
    for value in values.values():
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=counts.get)


def lora_state_dict(layers: Mapping[str, Mapping[str, LoraLayer]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, metadata)`` in diffusers/PEFT form: ``<component>.<path>.lora_A/B.weight`` and, per component,
    the PEFT ``LoraConfig`` fields diffusers reads back (``r``/``lora_alpha`` with per-layer patterns)."""
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    for component, by_path in layers.items():
        ranks = {path: layer.rank for path, layer in by_path.items()}
        alphas = {path: layer.scale * layer.rank for path, layer in by_path.items()}
        r, alpha = _most_common(ranks), _most_common(alphas)
        config = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            "target_modules": sorted(by_path),
        }
        metadata.update({f"{component}.{field}": value for field, value in config.items()})
        for path, layer in by_path.items():
            tensors[f"{component}.{path}.lora_A.weight"] = np.ascontiguousarray(layer.down)
            tensors[f"{component}.{path}.lora_B.weight"] = np.ascontiguousarray(layer.up)
    return tensors, metadata


def save_lora(
    save_directory: str | os.PathLike, layers: Mapping[str, Mapping[str, LoraLayer]], weight_name: str | None = None
) -> Path:
    """Write ``layers`` as diffusers' ``save_lora_weights`` does (PEFT keys + ``lora_adapter_metadata``); the file
    (``weight_name``, default ``pytorch_lora_weights.safetensors``) appears complete or not at all."""
    from safetensors.numpy import save_file

    name = LORA_WEIGHTS_NAME if weight_name is None else weight_name
    if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
        raise ValueError(f"weight_name must be a .safetensors file name or None, got {weight_name!r}")
    if not layers:
        raise ValueError("layers: nothing to save")
    tensors, metadata = lora_state_dict(layers)
    folder = Path(save_directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return folder / name
