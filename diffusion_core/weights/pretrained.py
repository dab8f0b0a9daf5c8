"""Framework-neutral half of ``from_pretrained``/``save_pretrained``: folders, Hub snapshots, config.json.

A ``path_or_repo_id`` is a local folder (used as is) or a Hub repo id, fetched with
``huggingface_hub.snapshot_download`` restricted to the config and the requested weight files
(``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself). Backends build the model and load
tensors; this module never imports torch or jax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion_core.configuration import (
    DIFFUSERS_FORMAT_VERSION,
    config_to_json_string,
    read_json_config,
    write_json_atomic,
)
from diffusion_core.weights.layout import (
    DIFFUSERS_WEIGHTS_NAME,
    add_variant,
    check_variant,
    index_name,
)

CONFIG_NAME = "config.json"


def hub_allow_patterns(subfolder: str | None, weights_name: str, variant: str | None) -> list[str]:
    """Snapshot patterns: ``config.json``, the single file, its shards and index, of ``variant`` only."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    stem, ext = add_variant(weights_name, variant).rsplit(".", 1)
    return [
        prefix + CONFIG_NAME,
        prefix + add_variant(weights_name, variant),
        prefix + index_name(weights_name, variant),
        f"{prefix}{stem}-[0-9]*-of-[0-9]*.{ext}",
    ]


def _download(repo_id: str, patterns: list[str], revision: str | None, local_files_only: bool) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with safetensors users
        raise FileNotFoundError(f"path_or_repo_id: {repo_id!r} is not a folder and huggingface_hub is missing") from e
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_files_only
        )
    except HFValidationError as e:
        raise FileNotFoundError(
            f"path_or_repo_id: {repo_id!r} is neither a local folder nor a valid Hub repo id"
        ) from e
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, offline mode, HTTP errors
        offline = "; HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"path_or_repo_id: {repo_id!r} is not a local folder and could not be fetched from the Hub "
            f"(revision={revision!r}, local_files_only={local_files_only}{offline}): {e}"
        ) from e
    return Path(path)


def resolve_pretrained_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
) -> Path:
    """The local folder holding ``config.json`` and the weights (a local folder, or a Hub snapshot)."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise ValueError(f"path_or_repo_id must be a str or path, got {type(path_or_repo_id).__name__}")
    if subfolder is not None and (
        not isinstance(subfolder, str) or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts
    ):
        raise ValueError(f"subfolder must be a relative folder name, got {subfolder!r}")
    check_variant(variant)
    local = Path(path_or_repo_id)
    if local.is_dir():
        root = local
    elif isinstance(path_or_repo_id, os.PathLike) or local.is_absolute() or str(path_or_repo_id).startswith("."):
        raise FileNotFoundError(f"path_or_repo_id: no such folder {str(path_or_repo_id)!r}")
    else:
        patterns = hub_allow_patterns(subfolder, weights_name, variant)
        root = _download(str(path_or_repo_id), patterns, revision, local_files_only)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"subfolder: no such folder {str(folder)!r}")
    return folder


def load_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (``_``-prefixed keys included)."""
    return read_json_config(folder, CONFIG_NAME)


def save_model_config(config: Mapping[str, Any], folder: str | os.PathLike, class_name: str) -> Path:
    """Write ``config.json`` byte-for-byte as diffusers does (``_class_name``, ``_diffusers_version``)."""
    data = {k: v for k, v in config.items() if not k.startswith("_")}
    data["_class_name"] = class_name
    data["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
    path = Path(folder) / CONFIG_NAME
    write_json_atomic(path, config_to_json_string(data))
    return path
