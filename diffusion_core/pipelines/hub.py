"""Finding a pipeline folder: a local folder as is, or one Hub snapshot of just the needed files.

For a Hub id, ``model_index.json`` is fetched first (which pins the revision to one commit),
then a single ``snapshot_download`` at that commit fetches, per needed component, its JSON/text
configs and the safetensors weights of the requested variant (single file, shards and index).
Pickle (``.bin``), ``.msgpack`` and ``.onnx`` files are never requested. ``HF_HUB_OFFLINE=1`` and
``local_files_only=True`` are honoured by huggingface_hub (cache only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from diffusion_core.pipelines.model_index import MODEL_INDEX_NAME, ModelIndex, read_model_index
from diffusion_core.weights.layout import DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME, check_variant
from diffusion_core.weights.pretrained import hub_allow_patterns

# Non-weight files a component folder may need: configs, tokenizer vocabularies and merges.
_CONFIG_PATTERNS = ("*.json", "*.txt")


def pipeline_allow_patterns(component_names: Iterable[str], variant: str | None) -> list[str]:
    """``allow_patterns`` for the given component folders: configs plus safetensors of ``variant`` only."""
    check_variant(variant)
    patterns = [MODEL_INDEX_NAME]
    for name in component_names:
        patterns += [f"{name}/{p}" for p in _CONFIG_PATTERNS]
        for weights_name in (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME):
            patterns += hub_allow_patterns(name, weights_name, variant)
    return list(dict.fromkeys(patterns))  # de-duplicated, order kept


def _hub_error(repo_id: str, revision: str | None, local_files_only: bool, err: Exception) -> FileNotFoundError:
    import huggingface_hub

    offline = "; HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
    return FileNotFoundError(
        f"path_or_repo_id: {repo_id!r} is not a local folder and could not be fetched from the Hub "
        f"(revision={revision!r}, local_files_only={local_files_only}{offline}): {err}"
    )


def _fetch_model_index(repo_id: str, revision: str | None, local_files_only: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id, MODEL_INDEX_NAME, revision=revision, local_files_only=local_files_only
            )
        )
    except HFValidationError as e:
        raise FileNotFoundError(
            f"path_or_repo_id: {repo_id!r} is neither a local folder nor a valid Hub repo id"
        ) from e
    except (OSError, ValueError) as e:  # missing entry, offline mode, HTTP errors
        raise _hub_error(repo_id, revision, local_files_only, e) from e


def resolve_pipeline_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool = False,
    select: Callable[[ModelIndex], Iterable[str]] | None = None,
) -> tuple[Path, ModelIndex]:
    """The local pipeline folder and its parsed ``model_index.json``.

    ``select(index)`` names the component folders to fetch from the Hub (default: every component
    present); components the caller supplies itself or cannot load are left out.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise ValueError(f"path_or_repo_id must be a str or path, got {type(path_or_repo_id).__name__}")
    check_variant(variant)
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local, read_model_index(local)
    if isinstance(path_or_repo_id, os.PathLike) or local.is_absolute() or str(path_or_repo_id).startswith("."):
        raise FileNotFoundError(f"path_or_repo_id: no such folder {str(path_or_repo_id)!r}")
    repo_id = str(path_or_repo_id)
    index_file = _fetch_model_index(repo_id, revision, local_files_only)
    commit = index_file.parent.name  # .../snapshots/<commit>/model_index.json: the revision, resolved once
    index = read_model_index(index_file.parent)
    if select is None:
        wanted = [n for n, spec in index.components.items() if not spec.is_absent]
    else:
        wanted = list(select(index))
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=commit,
            allow_patterns=pipeline_allow_patterns(wanted, variant),
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as e:
        raise _hub_error(repo_id, revision, local_files_only, e) from e
    return Path(folder), index
