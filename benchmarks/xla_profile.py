"""Where XLA:CPU spends a flax digits train step: per-op times from ``jax.profiler``, grouped by kind.

    python benchmarks/xla_profile.py [--batch 32] [--steps 3]

Compiles ``Trainer._step`` (the step ``train_step`` runs) for the digits UNet, traces ``--steps`` steps
with ``jax.profiler`` and sums the XLA op (thunk) events by kind: convolutions (forward, input gradient,
weight gradient), the layout transposes feeding them, dots, reductions and element-wise fusions. Op
times under the profiler are inflated against an untraced step (each thunk is timed), so the shares, not
the milliseconds, are the figure to read; they survive a loaded machine, as a wall-clock time does not.
Also prints the compiled program's temporary buffer (allocated afresh on every execution) and the page
faults and system time one untraced step costs.
"""

from __future__ import annotations

import argparse
import collections
import re
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine_line, pin_threads  # noqa: E402

pin_threads()

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? (\w[\w-]*)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_index(hlo: str) -> tuple[dict[str, tuple[str, str, str]], set[str]]:
    """``{instruction: (opcode, op_name metadata, called computation)}`` and the computations holding a convolution."""
    index, conv_comps, comp = {}, set(), ""
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode, rest = m.groups()
        if opcode == "convolution":
            conv_comps.add(comp)
        calls, meta = _CALLS.search(rest), _OP_NAME.search(rest)
        index[name] = (opcode, meta.group(1) if meta else "", calls.group(1) if calls else "")
    return index, conv_comps


def kind_of(name: str, index: dict[str, tuple[str, str, str]], conv_comps: set[str]) -> str:
    """The group an executed HLO instruction belongs to (by its opcode, fused computation and jax op name)."""
    opcode, op_name, called = index[name]
    backward = "transpose(" in op_name
    if opcode == "convolution" or called in conv_comps:
        if not op_name:
            return "conv weight gradient"
        return "conv input gradient" if backward else "conv forward"
    if "transpose_copy" in name or "copy_bitcast" in name:
        return "layout transposes/copies"
    if opcode == "dot" or "dot_general" in op_name:
        return "dots (attention, linear)"
    if "reduce" in op_name or opcode == "reduce":
        return "reductions (norms, softmax, loss)"
    if backward:
        return "element-wise fusions, backward"
    return "element-wise fusions, forward" if "jvp(" in op_name else "optimizer / EMA / other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import jax
    import numpy as np

    from diffusion_core import training
    from diffusion_core.cli_train import build_trainer
    from diffusion_core.training.presets import DIGITS_UNET_CONFIG

    data = training.load_digits(16)
    batches = [training.step_batch(data, s, args.batch, 0, 1000) for s in range(args.steps + 2)]
    trainer = build_trainer("flax", DIGITS_UNET_CONFIG, training.TrainConfig(batch_size=args.batch, seed=0))
    lr, decay = np.float32(1e-3), np.float32(0.99)
    compiled = trainer._step.lower(
        trainer.params, trainer.opt_state, trainer.ema, trainer._place(batches[0]), lr, decay
    ).compile()
    for b in batches[:2]:
        trainer.train_step(b, 1e-3, 0.99)
    before = resource.getrusage(resource.RUSAGE_SELF)
    trainer.train_step(batches[0], 1e-3, 0.99)
    after = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for b in batches[2:]:
                trainer.train_step(b, 1e-3, 0.99)
        trace = next(Path(folder).rglob("*.xplane.pb"))
        profile = jax.profiler.ProfileData.from_file(str(trace))
    index, conv_comps = hlo_index(compiled.as_text())
    totals: collections.Counter[str] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in index:
                    totals[kind_of(event.name, index, conv_comps)] += event.duration_ns
    memory = compiled.memory_analysis()
    print(f"# {machine_line()} · digits UNet train step, batch {args.batch}, {args.steps} traced steps")
    print(
        f"temporary buffer per execution: {memory.temp_size_in_bytes / 2**20:.0f} MiB; one untraced step: "
        f"{after.ru_minflt - before.ru_minflt} page faults, {after.ru_stime - before.ru_stime:.3f} s system time"
    )
    whole = sum(totals.values())
    print("| kind | share of XLA op time | ms/step (profiled) |")
    print("|---|---|---|")
    for kind, ns in totals.most_common():
        print(f"| {kind} | {100 * ns / whole:.1f}% | {ns / 1e6 / args.steps:.1f} |")


if __name__ == "__main__":
    main()
