"""Flax SD-1.5 UNet forward: blocked attention (ours) vs ``jax.nn.dot_product_attention``, and diffusers, same run.

    python benchmarks/profile_flax_unet.py [--latent 64] [--repeats 3] [--no-diffusers]

Builds the SD-1.5-config model once (random weights), jits one forward with the library's
``scaled_dot_product_attention`` and one with ``jax.nn.dot_product_attention`` swapped in at trace
time (the implementation before the blocked one), and times them interleaved (medians), next to
diffusers' torch model holding the same weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved_medians, machine_line, timed  # noqa: E402
from benchmarks.models import TEXT_SHAPE, build_models  # noqa: E402  (pins threads on import)


def _dense_attention(q, k, v, bias=None):
    """The previous implementation: XLA's dense (B, N, L, S) attention."""
    import jax

    return jax.nn.dot_product_attention(q, k, v, bias=bias)


def flax_forwards(flax_model, latent: int) -> dict:
    """Timed callables for the flax forward with blocked and with dense attention (both compiled first)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import diffusion_core.flax.models.attention as attention_module
    import diffusion_core.flax.models.layers as layers_module

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4, latent, latent)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, *TEXT_SHAPE)), jnp.float32)
    t = jnp.full((1,), 500, jnp.int32)
    graph, params = nnx.split(flax_model)
    blocked = layers_module.scaled_dot_product_attention
    fns = {}
    for name, impl in (("flax_blocked", blocked), ("flax_dense", _dense_attention)):
        attention_module.scaled_dot_product_attention = layers_module.scaled_dot_product_attention = impl
        fn = jax.jit(lambda params, x, t, ctx: nnx.merge(graph, params)(x, t, ctx))
        fn(params, x, t, ctx).block_until_ready()  # traces (with ``impl``) and compiles
        fns[name] = lambda fn=fn: timed(lambda: fn(params, x, t, ctx).block_until_ready())
    attention_module.scaled_dot_product_attention = layers_module.scaled_dot_product_attention = blocked
    return fns, (x, t, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch

    print(machine_line())
    ref, ours, flax_model = build_models("float32")
    del ours
    fns, (x, t, ctx) = flax_forwards(flax_model, args.latent)
    if not args.no_diffusers:
        xt, ct = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(ctx))
        tt = torch.tensor([500])

        def run_ref() -> None:
            with torch.inference_mode():
                ref(xt, tt, ct)

        fns["diffusers"] = lambda: timed(run_ref)
    med = interleaved_medians(fns, args.repeats)
    for name, seconds in med.items():
        print(f"{name:13} {seconds:7.2f}s")


if __name__ == "__main__":
    main()
