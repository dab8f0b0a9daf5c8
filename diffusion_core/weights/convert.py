"""The one rule table mapping diffusers/PyTorch state-dict tensors to Flax NNX parameters and back.

A PyTorch key ``down_blocks.0.resnets.1.conv1.weight`` names the path
``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')``: dotted parts become path entries
(digits become ints) and the last part is renamed by the rule that fits the target. Which
rule fits is read off the target tree (``{path: shape}``, e.g. the abstract state of an NNX
module), never off the model class: a rank-4 ``kernel`` is a conv, a rank-2 ``kernel`` a
linear layer, ``scale`` a norm, ``embedding`` an embedding table. Numpy only; both
directions stream one tensor at a time and raise ValueError listing every problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from diffusion_core.weights.transpose import transpose_copy

FlaxPath = tuple[str | int, ...]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """One leaf kind: PyTorch name, Flax name, Flax rank (None: any) and the torch->flax axis order."""

    torch_name: str
    flax_name: str
    rank: int | None
    to_flax: tuple[int, ...] | None = None  # np.transpose axes; None keeps the layout

    def flax_axes(self, rank: int) -> tuple[int, ...]:
        """The ``np.transpose`` axes from the PyTorch to the Flax layout of a rank-``rank`` tensor."""
        return tuple(range(rank)) if self.to_flax is None else self.to_flax

    def flax_array(self, array: np.ndarray) -> np.ndarray:
        """``array`` in the Flax layout: itself when the layout is kept, else a new aligned contiguous copy."""
        return array if self.to_flax is None else transpose_copy(array, self.to_flax)

    def flax_copy(self, array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """``array`` in the Flax layout, cast to ``dtype`` if given, always as a new aligned contiguous copy."""
        return transpose_copy(array, self.flax_axes(array.ndim), dtype)

    def torch_array(self, array: np.ndarray) -> np.ndarray:
        """``array`` in the PyTorch layout: itself when the layout is kept, else a new aligned contiguous copy."""
        return array if self.to_flax is None else transpose_copy(array, np.argsort(self.to_flax))

    def flax_shape(self, torch_shape: Shape) -> Shape:
        return torch_shape if self.to_flax is None else tuple(torch_shape[i] for i in self.to_flax)


RULES: tuple[Rule, ...] = (
    Rule("weight", "kernel", 4, (2, 3, 1, 0)),  # conv: OIHW <-> HWIO
    Rule("weight", "kernel", 2, (1, 0)),  # linear: (out, in) <-> (in, out)
    Rule("weight", "scale", 1),  # GroupNorm / LayerNorm
    Rule("weight", "embedding", 2),  # nn.Embedding <-> nnx.Embed
    Rule("bias", "bias", 1),
    Rule("weight", "weight", None),  # a tensor kept as is (GaussianFourierProjection's frozen weight)
    Rule("positional_embedding", "positional_embedding", None),  # AttentionPooling's (1, C) class-token position
    # PriorTransformer's / UnCLIPTextProjModel's bare parameters, kept as is (the prior's positional table above)
    Rule("prd_embedding", "prd_embedding", None),
    Rule("clip_mean", "clip_mean", None),
    Rule("clip_std", "clip_std", None),
    Rule("learned_classifier_free_guidance_embeddings", "learned_classifier_free_guidance_embeddings", None),
)


def key_to_path(key: str) -> FlaxPath:
    """``'up_blocks.0.attentions.1.to_out.0.weight'`` -> ``('up_blocks', 0, ..., 'to_out', 0, 'weight')``."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def path_to_key(path: FlaxPath) -> str:
    """The inverse of :func:`key_to_path`."""
    return ".".join(str(part) for part in path)


def _fits(rule: Rule, rank: int) -> bool:
    return rule.rank is None or rule.rank == rank


def match_torch_key(key: str, target: Mapping[FlaxPath, Shape]) -> tuple[FlaxPath, Rule] | None:
    """The target path and rule for a PyTorch key, or None when no rule lands on a target leaf."""
    *prefix, name = key_to_path(key)
    found = []
    for rule in RULES:
        path = (*prefix, rule.flax_name)
        if rule.torch_name == name and path in target and _fits(rule, len(target[path])):
            found.append((path, rule))
    return found[0] if len(found) == 1 else None


def match_flax_path(path: FlaxPath, rank: int) -> tuple[str, Rule] | None:
    """The PyTorch key and rule for a Flax leaf of ``rank`` dimensions, or None if no rule fits."""
    *prefix, name = path
    for rule in RULES:
        if rule.flax_name == name and _fits(rule, rank):
            return path_to_key((*prefix, rule.torch_name)), rule
    return None


def _raise_problems(direction: str, problems: Mapping[str, list[str]]) -> None:
    lines = [f"{kind} ({len(items)}): {sorted(items)}" for kind, items in problems.items() if items]
    if lines:
        raise ValueError(f"{direction}: state dict does not match the target\n  " + "\n  ".join(lines))


def _problems() -> dict[str, list[str]]:
    return {"unmatched": [], "unexpected": [], "shape mismatch": [], "missing": []}


def _checked_match(
    key: str, shape: Shape, target: Mapping[FlaxPath, Shape], seen: set[FlaxPath], problems: dict[str, list[str]]
) -> tuple[FlaxPath, Rule] | None:
    """The target path and rule of a PyTorch ``key`` of ``shape``, or None after noting why it does not fit."""
    match = match_torch_key(key, target)
    if match is None:
        problems["unmatched"].append(key)
        return None
    path, rule = match
    if path in seen:
        problems["unexpected"].append(f"{key} (given twice)")
        return None
    seen.add(path)
    if rule.flax_shape(tuple(shape)) != tuple(target[path]):
        problems["shape mismatch"].append(f"{key}: {tuple(shape)} -> {path} {tuple(target[path])}")
        return None
    return match


def torch_to_flax(
    items: Iterable[tuple[str, np.ndarray]], target: Mapping[FlaxPath, Shape]
) -> Iterator[tuple[FlaxPath, np.ndarray]]:
    """Stream ``(torch_key, array)`` as ``(flax_path, array)`` in the Flax layout.

    ``target`` maps every Flax parameter path to its shape. After the last item, raises
    ValueError listing unmatched keys, target leaves never filled (missing), keys given twice
    (unexpected) and shape mismatches. Arrays keep their dtype.
    """
    seen: set[FlaxPath] = set()
    problems = _problems()
    for key, array in items:
        array = np.asarray(array)
        match = _checked_match(key, array.shape, target, seen, problems)
        if match is not None:
            yield match[0], match[1].flax_array(array)
    problems["missing"] = [path_to_key(p) for p in target if p not in seen]
    _raise_problems("torch_to_flax", problems)


def torch_to_flax_plan(
    shapes: Mapping[str, Shape], target: Mapping[FlaxPath, Shape]
) -> dict[str, tuple[FlaxPath, Rule]]:
    """``{torch_key: (flax_path, rule)}`` for a state dict known by its shapes only (e.g. a checkpoint's header).

    The same matching and the same ValueError as :func:`torch_to_flax`, raised before any tensor is read;
    ``rule.flax_copy`` then converts each tensor on its own (in any order, on any thread).
    """
    seen: set[FlaxPath] = set()
    problems = _problems()
    plan = {}
    for key, shape in shapes.items():
        match = _checked_match(key, shape, target, seen, problems)
        if match is not None:
            plan[key] = match
    problems["missing"] = [path_to_key(p) for p in target if p not in seen]
    _raise_problems("torch_to_flax", problems)
    return plan


def flax_to_torch(
    items: Iterable[tuple[FlaxPath, np.ndarray]], target: Mapping[str, Shape] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``(flax_path, array)`` as ``(torch_key, array)`` in the PyTorch layout.

    ``target`` (optional) maps every expected PyTorch key to its shape; with it, missing,
    unexpected and mis-shaped keys are reported too. Leaves no rule fits are always reported.
    """
    seen: set[str] = set()
    problems = _problems()
    for path, array in items:
        array = np.asarray(array)
        match = match_flax_path(tuple(path), array.ndim)
        if match is None:
            problems["unmatched"].append(path_to_key(path))
            continue
        key, rule = match
        if key in seen or (target is not None and key not in target):
            problems["unexpected"].append(key)
            continue
        seen.add(key)
        out = rule.torch_array(array)
        if target is not None and out.shape != tuple(target[key]):
            problems["shape mismatch"].append(f"{path_to_key(path)}: {out.shape} -> {key} {tuple(target[key])}")
            continue
        yield key, out
    if target is not None:
        problems["missing"] = [k for k in target if k not in seen]
    _raise_problems("flax_to_torch", problems)
