"""The compiled half of the Flax Stable Diffusion pipelines: jitted text encoding and VAE calls, the per-image
rows the denoising program (``diffusion_core.flax.sampling.denoise_loop`` under ``run_program``) reads.

Per-image inputs (start noise, text embeddings, image latents, masks) travel as one flat float32 row per image
(``ravel_pytree``), so ``DiffusionPipeline.run_program`` splits them over devices together with the image's key
and image ``b`` sees the same inputs whichever device computes it. Scalars shared by the batch (guidance scales) travel
with the network parameters, so changing them does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.flatten_util import ravel_pytree

from diffusion_core.flax.sampling import per_example_normal
from diffusion_core.models.clip_config import CLIPTextWithProjectionOutput

# Posterior draws of the VAE (img2img / inpaint encodes) use image b's key folded with a stream id from here
# on (one per encoded input), far from the model-call indices that the step noise folds in.
POSTERIOR_STREAM = 2**30


# --- jitted component calls (nnx.jit caches per graph and input shapes) --------------------------------


@nnx.jit(static_argnames=("clip_skip",))
def encode_text(text_encoder: nnx.Module, input_ids: jax.Array, clip_skip: int | None = None) -> jax.Array:
    """(B, L) token ids -> (B, L, D) embeddings; ``clip_skip`` layers from the end, then the final layer norm."""
    if clip_skip is None:
        return text_encoder(input_ids).last_hidden_state
    states = text_encoder(input_ids, output_hidden_states=True).hidden_states
    return text_encoder.final_layer_norm(states[-(clip_skip + 1)])


@nnx.jit(static_argnames=("layer",))
def encode_text_layer(text_encoder: nnx.Module, input_ids: jax.Array, layer: int) -> tuple[jax.Array, Any]:
    """(B, L) ids -> (hidden states ``[layer]`` (B, L, D) without the final norm, projected pooled text (B, P) or
    None for a plain CLIPTextModel): what SDXL conditions on (``layer=-2``: the penultimate layer)."""
    out = text_encoder(input_ids, output_hidden_states=True)
    return out.hidden_states[layer], out.text_embeds if isinstance(out, CLIPTextWithProjectionOutput) else None


@nnx.jit
def encode_text_unnormed(text_encoder: nnx.Module, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, L) ids -> (the last layer's hidden states before the final norm (B, L, D), pooled (B, D)):
    what the x2 latent upscaler conditions on."""
    out = text_encoder(input_ids, output_hidden_states=True)
    return out.hidden_states[-1], out.pooler_output


@nnx.jit
def vae_decode(vae: nnx.Module, latents: jax.Array) -> jax.Array:
    """(B, C, h, w) unscaled latents -> (B, 3, H, W) images in [-1, 1]."""
    return vae.decode(latents)


@nnx.jit
def vae_encode_mode(vae: nnx.Module, images: jax.Array) -> jax.Array:
    """(B, 3, H, W) images in [-1, 1] -> the posterior mode (B, C, h, w) (unscaled)."""
    return vae.encode(images).mode()


@nnx.jit(static_argnames=("stream",))
def vae_encode_sample(vae: nnx.Module, images: jax.Array, keys: jax.Array, stream: int = 0) -> jax.Array:
    """A posterior draw (B, C, h, w) per image; image b's noise from ``fold_in(keys[b], POSTERIOR_STREAM + stream)``."""
    posterior = vae.encode(images)
    draw_keys = jax.vmap(lambda k: jax.random.fold_in(k, POSTERIOR_STREAM + stream))(keys)
    return posterior.sample(per_example_normal(draw_keys, posterior.mean.shape[1:], posterior.mean.dtype))


@nnx.jit
def vae_encode_with_noise(vae: nnx.Module, images: jax.Array, noise: jax.Array) -> jax.Array:
    """The posterior draw ``mean + std * noise`` (B, C, h, w) for given standard-normal ``noise`` (B, C, h, w)."""
    return vae.encode(images).sample(noise.astype(jnp.float32))


# --- per-image rows ---------------------------------------------------------------------------------------


def pack_rows(inputs: Mapping[str, Any]) -> tuple[jax.Array, Callable[[jax.Array], dict], tuple]:
    """``{name: (B, ...)}`` -> ``((B, N) float32 rows, row -> {name: (...)}, signature)``.

    The signature (names, per-image shapes) is part of a program's cache key: the unravel function
    closed over by a compiled program is valid exactly for it.
    """
    tree = {name: jnp.asarray(value, jnp.float32) for name, value in inputs.items()}
    sizes = {value.shape[0] for value in tree.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-image inputs must share one batch size, got { {n: v.shape for n, v in tree.items()} }")
    _, unravel = ravel_pytree(jax.tree.map(lambda a: a[0], tree))
    rows = jax.vmap(lambda t: ravel_pytree(t)[0])(tree)  # (B, N)
    signature = tuple((name, tuple(value.shape[1:])) for name, value in sorted(tree.items()))
    return rows, unravel, signature


def unpack_rows(rows: jax.Array, unravel: Callable[[jax.Array], dict]) -> dict:
    """(B, N) rows -> ``{name: (B, ...)}``."""
    return jax.vmap(unravel)(rows)
