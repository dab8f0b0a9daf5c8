"""Several ControlNets as one (``MultiControlNetModel``), written once for both backends: the folder layout and
how the nets' residuals add up.

diffusers saves the first ControlNet of a pipeline in ``controlnet/`` and the others beside it in
``controlnet_1/``, ``controlnet_2/``, ... (the folder name plus ``_<index>``); ``model_index.json`` names the
component ``["diffusers", "MultiControlNetModel"]``. Each net's residuals are already scaled by its own
``conditioning_scale``; the UNet gets their sums, skip by skip, in net order (diffusers' order of additions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_controlnets", "controlnet_folders", "sibling_folder", "sum_residuals"]


def sibling_folder(folder: str | os.PathLike, index: int) -> Path:
    """Where net ``index`` of a MultiControlNetModel saved at ``folder`` lives: ``folder`` itself for the first
    net, then ``<folder>_1``, ``<folder>_2``, ... beside it."""
    base = Path(folder)
    return base if index == 0 else base.with_name(f"{base.name}_{index}")


def controlnet_folders(path: str | os.PathLike, subfolder: str | None = None) -> list[Path]:
    """The local folders of a saved MultiControlNetModel: ``path[/subfolder]`` and its ``_1``, ``_2``, ... siblings
    while they exist. FileNotFoundError when the first is not a local folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path_or_repo_id must be a str or path, got {type(path).__name__}")
    if subfolder is not None and not isinstance(subfolder, str):
        raise ValueError(f"subfolder must be a str or None, got {type(subfolder).__name__}")
    first = Path(path).expanduser() / subfolder if subfolder else Path(path).expanduser()
    if not first.is_dir():
        raise FileNotFoundError(
            f"path_or_repo_id: MultiControlNetModel loads from a local folder holding the first ControlNet "
            f"(the others in <folder>_1, <folder>_2, ...); no such folder {str(first)!r}"
        )
    folders = [first]
    while sibling_folder(first, len(folders)).is_dir():
        folders.append(sibling_folder(first, len(folders)))
    return folders


def check_controlnets(controlnets: Any, controlnet_class: type) -> list[Any]:
    """``controlnets`` as a list, checked: a non-empty list or tuple of ``controlnet_class`` instances."""
    if not isinstance(controlnets, (list, tuple)) or not controlnets:
        raise ValueError(f"controlnets must be a non-empty list of ControlNetModel, got {controlnets!r}")
    wrong = [type(net).__name__ for net in controlnets if not isinstance(net, controlnet_class)]
    if wrong:
        raise ValueError(f"controlnets: every entry must be a ControlNetModel of this backend, got {wrong}")
    return list(controlnets)


def sum_residuals(outputs: Sequence[tuple[Sequence[Any], Any]]) -> tuple[list[Any], Any]:
    """``[(down residuals, mid residual) per net]`` -> their sums, skip by skip, added in net order."""
    down, mid = list(outputs[0][0]), outputs[0][1]
    for net_down, net_mid in outputs[1:]:
        down = [total + r for total, r in zip(down, net_down, strict=True)]
        mid = mid + net_mid
    return down, mid
