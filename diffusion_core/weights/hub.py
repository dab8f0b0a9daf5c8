"""Where a ``path_or_repo_id`` points: a local folder, or a Hub repo id fetched as one restricted snapshot.

The rule, in one place for models, tokenizers and pipelines (:func:`local_or_repo_id`): an existing
folder is used as is; something that can only be a path (a ``PathLike``; a string starting with ``.``,
``/`` or ``~``, holding a backslash, or with more than one ``/``) and does not exist fails at once, without
asking the Hub; anything else is a repo id. A repo id that cannot be fetched gives one error that says both
readings (no such local folder, and the Hub's answer). When the Hub's host cannot even be resolved (no
network) and no proxy is configured, the error comes at once instead of after huggingface_hub's retries;
``HF_HUB_OFFLINE=1`` and ``local_files_only=True`` look in the local cache only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from diffusion_core.weights.layout import (
    DIFFUSERS_WEIGHTS_NAME,
    add_variant,
    check_variant,
    index_name,
    pickle_weights_name,
)

CONFIG_NAME = "config.json"
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def looks_like_path(text: str) -> bool:
    """True for strings that cannot be a Hub repo id (``org/name`` or ``name``), only a path."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def local_or_repo_id(path_or_repo_id: str | os.PathLike) -> Path | str:
    """An existing local folder as a Path, or ``path_or_repo_id`` as a Hub repo id (str).

    FileNotFoundError at once for a path that does not exist (or is a file, not a folder).
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise ValueError(f"path_or_repo_id must be a str or path, got {type(path_or_repo_id).__name__}")
    text = os.fspath(path_or_repo_id)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise FileNotFoundError(f"path_or_repo_id: {text!r} is a file; expected a model or pipeline folder")
    if isinstance(path_or_repo_id, os.PathLike) or looks_like_path(text):
        raise FileNotFoundError(
            f"path_or_repo_id: no such folder {text!r} (looked at {str(local.absolute())!r}); "
            "it is a path, so the Hub was not asked"
        )
    return text


def _hub_host_unresolvable() -> str | None:
    """Why the Hub cannot be reached (its host name does not resolve, no proxy set), or None if it may be."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be resolved ({e}): no network"
    return None


def hub_allow_patterns(
    subfolder: str | None, weights_name: str, variant: str | None, allow_pickle: bool = False
) -> list[str]:
    """Snapshot patterns: ``config.json``, the single file, its shards and index, of ``variant`` only.

    With ``allow_pickle``, the same patterns for the matching ``.bin`` name are added.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + CONFIG_NAME]
    for name in (weights_name, pickle_weights_name(weights_name)) if allow_pickle else (weights_name,):
        stem, ext = add_variant(name, variant).rsplit(".", 1)
        patterns += [
            prefix + add_variant(name, variant),
            prefix + index_name(name, variant),
            f"{prefix}{stem}-[0-9]*-of-[0-9]*.{ext}",
        ]
    return patterns


def hub_fetch(repo_id: str, revision: str | None, local_files_only: bool, fetch: Callable[[bool], str]) -> Path:
    """Run one huggingface_hub download ``fetch(local_files_only)`` for ``repo_id``.

    With no network (the Hub's host does not resolve and no proxy is set) the download looks in the local
    cache only, at once, instead of retrying. A failure becomes one FileNotFoundError naming both readings
    of ``repo_id`` (no local folder; the Hub's answer, with revision and cause).
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import HFValidationError
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with safetensors users
        raise FileNotFoundError(f"path_or_repo_id: {repo_id!r} is not a folder and huggingface_hub is missing") from e
    local = str(Path(repo_id).absolute())
    offline = constants.HF_HUB_OFFLINE
    unreachable = None if local_files_only or offline else _hub_host_unresolvable()
    try:
        return Path(fetch(local_files_only or unreachable is not None))
    except HFValidationError:
        raise FileNotFoundError(
            f"path_or_repo_id: {repo_id!r} is neither a local folder (no {local!r}) nor a valid Hub repo id"
        ) from None
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, offline mode, HTTP errors
        if unreachable is not None or offline or local_files_only:
            why = unreachable or ("HF_HUB_OFFLINE is set" if offline else "local_files_only=True")
            cause = f"{why}, and it is not in the local Hub cache"
        else:
            cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise FileNotFoundError(
            f"path_or_repo_id: {repo_id!r} is not a local folder (no {local!r}), and as a Hub repo id "
            f"(revision={revision!r}) it could not be fetched: {cause}"
        ) from None


def download_snapshot(
    repo_id: str, allow_patterns: list[str], revision: str | None = None, local_files_only: bool = False
) -> Path:
    """``huggingface_hub.snapshot_download`` of only ``allow_patterns``; FileNotFoundError naming the cause."""

    def fetch(local_only: bool) -> str:
        import huggingface_hub

        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=local_only
        )

    return hub_fetch(repo_id, revision, local_files_only, fetch)


def _check_subfolder(subfolder: str | None) -> None:
    if subfolder is not None and (
        not isinstance(subfolder, str) or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts
    ):
        raise ValueError(f"subfolder must be a relative folder name, got {subfolder!r}")


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    allow_patterns: list[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is, or the Hub snapshot of ``allow_patterns`` of a repo id; then ``subfolder`` inside it.

    ``allow_patterns`` are relative to the repo root (``subfolder`` included, e.g. ``"unet/config.json"``).
    A path that does not exist (see :func:`local_or_repo_id`) raises FileNotFoundError, as does a missing
    subfolder.
    """
    _check_subfolder(subfolder)
    found = local_or_repo_id(path_or_repo_id)
    if isinstance(found, Path):
        root = found
    else:
        root = download_snapshot(found, list(allow_patterns), revision, local_files_only)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"subfolder: no such folder {str(folder)!r}")
    return folder


def resolve_pretrained_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    weights_name: str = DIFFUSERS_WEIGHTS_NAME,
    allow_pickle: bool = False,
) -> Path:
    """The local folder holding ``config.json`` and the weights (a local folder, or a Hub snapshot)."""
    _check_subfolder(subfolder)
    check_variant(variant)
    return resolve_folder(
        path_or_repo_id,
        hub_allow_patterns(subfolder, weights_name, variant, allow_pickle),
        subfolder=subfolder,
        revision=revision,
        local_files_only=local_files_only,
    )


def resolve_flax_weights(
    path_or_repo_id: str | os.PathLike,
    weights_name: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path | None:
    """The Flax ``*.msgpack`` weights file (``weights_name``; diffusers <= 0.39, transformers' Flax models) of a
    local folder or a Hub repo, or None where there is none (or the repo cannot be fetched).

    From the Hub only ``config.json`` and ``weights_name`` under ``subfolder`` are fetched (no ``*.bin``).
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        folder = resolve_folder(
            path_or_repo_id,
            [prefix + CONFIG_NAME, prefix + weights_name],
            subfolder=subfolder,
            revision=revision,
            local_files_only=local_files_only,
        )
    except FileNotFoundError:
        return None
    file = folder / weights_name
    return file if file.is_file() else None
