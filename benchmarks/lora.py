"""LoRA text-to-image: unfused vs fused, ours (torch, flax warm) vs diffusers + peft, same run.

    python benchmarks/lora.py [--configs tiny sd15] [--rank 16] [--repeats 3]

The random-weight pipelines of ``benchmarks/pipelines.py`` get one random LoRA of rank ``--rank`` on every UNet
attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), saved once as a PEFT safetensors file that all
three load. Each contender runs the same prompt from the same numpy latents unfused (adapter weight 0.8) and fused
(``fuse_lora()``); medians and ratios to diffusers unfused are printed. Flax keeps the (zero-scaled) LoRA term in
its program after ``fuse_lora`` (so a fuse never recompiles); "fused+unload" drops it (diffusers' way to bake a
LoRA in; one recompile). The Flax line also reports the compile time of a call after ``set_adapters`` (0: none).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved_medians, machine_line, pin_threads, timed  # noqa: E402
from benchmarks.pipelines import CONFIGS, PROMPT, write_pipeline  # noqa: E402

pin_threads()

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(pipeline: Path, rank: int, out: Path) -> Path:
    """A random PEFT LoRA on the UNet's attention projections (non-zero ``lora_B``), alpha = rank."""
    import numpy as np
    from safetensors.numpy import save_file

    from diffusion_core.torch.lora import lora_targets
    from diffusion_core.torch.models import UNet2DConditionModel

    rng = np.random.default_rng(0)
    targets = lora_targets(UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet"))
    tensors = {}
    for path, shape in targets.items():
        if path.endswith(PROJECTIONS):
            out_features, in_features = shape
            down = rng.standard_normal((rank, in_features)) / in_features**0.5
            tensors[f"unet.{path}.lora_A.weight"] = down.astype(np.float32)
            tensors[f"unet.{path}.lora_B.weight"] = (0.1 * rng.standard_normal((out_features, rank))).astype(np.float32)
    save_file(tensors, out)
    return out


def contenders(name: str, folder: Path, rank: int, notes: list[str]):
    """Timed callables: diffusers / torch / flax, each unfused and fused (flax also fused then unloaded)."""
    import diffusers
    import jax
    import numpy as np
    import torch

    from diffusion_core.flax import DiffusionPipeline as FlaxPipeline
    from diffusion_core.torch import DiffusionPipeline as TorchPipeline

    cfg, path = CONFIGS[name], folder / name
    lora = write_lora(path, rank, folder / f"{name}_lora.safetensors")
    latent = cfg["size"] // (2 ** (len(cfg["vae"]["block_out_channels"]) - 1))
    latents = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)
    kw = dict(num_inference_steps=cfg["steps"], guidance_scale=7.5, height=cfg["size"], width=cfg["size"])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipes = {"diffusers": ref, "torch": TorchPipeline.from_pretrained(path), "flax": FlaxPipeline.from_pretrained(path)}
    kw.update(prompt=PROMPT, output_type="np")
    runs = {
        "diffusers": lambda: ref(latents=torch.from_numpy(latents), **kw).images,
        "torch": lambda: pipes["torch"](latents=latents, **kw).images,
        "flax": lambda: np.asarray(pipes["flax"](latents=latents, key=jax.random.key(0), **kw).images),
    }
    for who, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora, adapter_name="bench")
        pipe.set_adapters("bench", 0.8)
        runs[who]()  # warm (flax: compile)
        unfused_image = runs[who]()
        pipe.fuse_lora()
        diff = float(np.abs(runs[who]() - unfused_image).max())
        notes.append(f"{name}: {who} max |fused - unfused| {diff:.1e}")
        pipe.unfuse_lora()
    flax = pipes["flax"]
    flax.set_adapters("bench", 0.5)
    runs["flax"]()
    notes.append(f"{name}: flax compile time after set_adapters: {flax.last_compile_seconds:.2f}s")

    def fused_run(who):
        pipes[who].fuse_lora()
        try:
            return timed(runs[who])
        finally:
            pipes[who].unfuse_lora()

    out = {f"{who} unfused": (lambda who=who: timed(runs[who])) for who in pipes}
    out.update({f"{who} fused": (lambda who=who: fused_run(who)) for who in pipes})
    return out, lambda: _fused_unloaded(flax, runs["flax"])


def _fused_unloaded(flax, run) -> float:
    flax.fuse_lora()
    flax.unload_lora_weights()
    run()  # the base program (compiled once)
    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "sd15"], choices=sorted(CONFIGS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the temporary pipelines")
    args = parser.parse_args()
    import diffusers
    import torch

    torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
    diffusers.utils.logging.set_verbosity_error()
    print(machine_line())
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in args.configs:
            write_pipeline(name, Path(tmp))
            fns, last = contenders(name, Path(tmp), args.rank, notes)
            med = interleaved_medians(fns, args.repeats)
            med["flax fused+unload"] = last()
            base = med["diffusers unfused"]
            for who, seconds in med.items():
                print(f"{name:5} rank {args.rank:3d} {who:18} {seconds:7.2f}s  {seconds / base:5.2f}x", flush=True)
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
