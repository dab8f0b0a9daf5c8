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

from diffusion_core.pipelines.model_index import CLASSES_FILE, MODEL_INDEX_NAME, ModelIndex, read_model_index
from diffusion_core.weights.hub import download_snapshot, hub_allow_patterns, hub_fetch, local_or_repo_id
from diffusion_core.weights.layout import DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME, check_variant

# Non-weight files a component folder may need: configs, tokenizer vocabularies and merges, T5's spiece.model.
_CONFIG_PATTERNS = ("*.json", "*.txt", "spiece.model")


def pipeline_allow_patterns(component_names: Iterable[str], variant: str | None) -> list[str]:
    """``allow_patterns`` for the given component folders: configs plus safetensors of ``variant`` only."""
    check_variant(variant)
    patterns = [MODEL_INDEX_NAME, CLASSES_FILE]
    for name in component_names:
        patterns += [f"{name}/{p}" for p in _CONFIG_PATTERNS]
        for weights_name in (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME):
            patterns += hub_allow_patterns(name, weights_name, variant)
    return list(dict.fromkeys(patterns))  # de-duplicated, order kept


def _fetch_model_index(repo_id: str, revision: str | None, local_files_only: bool) -> Path:
    def fetch(local_only: bool) -> str:
        import huggingface_hub

        return huggingface_hub.hf_hub_download(
            repo_id, MODEL_INDEX_NAME, revision=revision, local_files_only=local_only
        )

    return hub_fetch(repo_id, revision, local_files_only, fetch)


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
    check_variant(variant)
    repo_id = local_or_repo_id(path_or_repo_id)
    if isinstance(repo_id, Path):
        return repo_id, read_model_index(repo_id)
    index_file = _fetch_model_index(repo_id, revision, local_files_only)
    commit = index_file.parent.name  # .../snapshots/<commit>/model_index.json: the revision, resolved once
    index = read_model_index(index_file.parent)
    if select is None:
        wanted = [n for n, spec in index.components.items() if not spec.is_absent]
    else:
        wanted = list(select(index))
    folder = download_snapshot(
        repo_id, pipeline_allow_patterns(wanted, variant), revision=commit, local_files_only=local_files_only
    )
    return folder, index


def resolve_pipeline_configs(
    path_or_repo_id: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False
) -> tuple[Path, ModelIndex]:
    """A pipeline folder's ``model_index.json`` and every component's configs and vocabularies, no weights.

    A local folder is returned as is; for a Hub id only the JSON/text files are fetched (what ``convert``
    needs to lay out a single-file checkpoint as that pipeline).
    """
    repo_id = local_or_repo_id(path_or_repo_id)
    if isinstance(repo_id, Path):
        return repo_id, read_model_index(repo_id)
    index_file = _fetch_model_index(repo_id, revision, local_files_only)
    index = read_model_index(index_file.parent)
    patterns = [MODEL_INDEX_NAME, CLASSES_FILE] + [f"{n}/{p}" for n in index.components for p in _CONFIG_PATTERNS]
    folder = download_snapshot(repo_id, patterns, revision=index_file.parent.name, local_files_only=local_files_only)
    return folder, index
