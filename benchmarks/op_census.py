"""Count the aten ops of one torch forward pass by kind and dtype: the load-independent half of a speed comparison.

    python benchmarks/op_census.py [--latent 32] [--dtype bfloat16]   # SD-1.5 UNet: ours vs diffusers

Wall times on a shared machine move by tens of percent between runs; the ops a forward dispatches do not.
``op_census(model, *args)`` runs one pass under ``torch.profiler`` (shapes and dtypes recorded) and counts
every heavy op (convolution, matmul, fused attention, softmax) with the dtype it ran in, every dtype
conversion and every layout copy (``clone``/``copy_`` that ``.contiguous()``, ``reshape`` of a strided view
or a kernel's own ``contiguous()`` makes) with the bytes it wrote; the bias a matmul kernel copies into
its output is part of that matmul, not a copy. ``tests/torch_models/test_bf16_path.py`` holds our UNet to
diffusers' counts on a small SD-1.5-style config; this script prints them for the real SD-1.5 config.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# aten ops by what they cost, at the level every CPU path goes through once (conv2d -> convolution,
# linear -> addmm/mm or matmul -> mm/bmm, scaled_dot_product_attention -> the fused kernel or bmm + softmax).
HEAVY_OPS = {
    "aten::convolution": "conv",
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::baddbmm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention",
    "aten::_scaled_dot_product_cudnn_attention": "attention",
    "aten::_softmax": "softmax",
}
# the profiler's dtype names -> torch's
_DTYPES = {"float": "float32", "double": "float64", "c10::BFloat16": "bfloat16", "c10::Half": "float16"}
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass
class Census:
    """What one forward dispatched: heavy ops by (kind, dtype), casts and copies with the MiB they wrote."""

    heavy: Counter = field(default_factory=Counter)  # (kind, dtype name) -> calls
    casts: int = 0  # copies that changed the dtype
    cast_mib: float = 0.0
    copies: int = 0  # same-dtype copies outside the heavy kernels (layout changes)
    copy_mib: float = 0.0
    ops: Counter = field(default_factory=Counter)  # every aten op -> calls

    def heavy_in(self, dtype: torch.dtype) -> int:
        """Heavy-op calls that ran in ``dtype``."""
        name = str(dtype).removeprefix("torch.")
        return sum(n for (_, d), n in self.heavy.items() if d == name)

    def lines(self) -> list[str]:
        heavy = ", ".join(f"{kind} {dtype} x{n}" for (kind, dtype), n in sorted(self.heavy.items()))
        return [
            f"heavy ops: {heavy}",
            f"dtype casts: {self.casts} calls, {self.cast_mib:.1f} MiB written",
            f"layout copies: {self.copies} calls, {self.copy_mib:.1f} MiB written",
        ]

    def add(self, event) -> None:
        """Count one profiler event (``torch.autograd.profiler_util.FunctionEvent``)."""
        self.ops[event.name] += 1
        dtypes = [_DTYPES.get(d, d) for d in event.input_dtypes]
        if event.name in HEAVY_OPS:
            self.heavy[HEAVY_OPS[event.name], dtypes[0]] += 1
            return
        parent = event.cpu_parent
        if event.name != "aten::copy_" or (parent is not None and parent.name in HEAVY_OPS):
            return
        mib = math.prod(event.input_shapes[0]) * _BYTES.get(dtypes[0], 4) / 2**20  # destination
        if dtypes[0] != dtypes[1]:
            self.casts += 1
            self.cast_mib += mib
        else:
            self.copies += 1
            self.copy_mib += mib


def op_census(model: torch.nn.Module, *args, **kwargs) -> Census:
    """Run ``model(*args, **kwargs)`` once under ``torch.inference_mode`` and count what it dispatched."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(*args, **kwargs)
    census = Census()
    for event in prof.events():
        census.add(event)
    return census


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.models import TEXT_SHAPE, build_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    ref, ours, _ = build_models(args.dtype, contenders=("diffusers", "torch"))
    dtype = ours.dtype
    x = torch.randn(1, 4, args.latent, args.latent, dtype=dtype)
    ctx = torch.randn(1, *TEXT_SHAPE, dtype=dtype)
    t = torch.tensor([500])
    print(f"SD-1.5 UNet, {args.latent}x{args.latent} latents, batch 1, {args.dtype}")
    for name, model in (("diffusers", ref), ("ours", ours)):
        print(f"{name}:")
        for line in op_census(model, x, t, ctx).lines():
            print(f"  {line}")


if __name__ == "__main__":
    main()
