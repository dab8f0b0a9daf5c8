"""Flax NNX building blocks of the UNets, named as diffusers names them (NHWC inside).

Attribute names (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out[0]``, ...) mirror
diffusers 0.42.1, so ``diffusion_core.weights.convert`` maps a diffusers state dict onto
``nnx.state(module)`` mechanically. Feature maps are (B, H, W, C) here; the UNet transposes
at its public NCHW boundary.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_core.models import timestep_embedding
from diffusion_core.models.model_config import TIME_SCALE_SHIFTS, activation_name

Activation = Callable[[jax.Array], jax.Array]
Padding = int | tuple[tuple[int, int], tuple[int, int]]  # symmetric, or ((top, bottom), (left, right))


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' activations by canonical name (``model_config.activation_name`` checks and maps aliases)
_ACTIVATIONS: dict[str, Activation] = {
    "silu": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Activation:
    """Return the activation function for a diffusers activation name."""
    return _ACTIVATIONS[activation_name(name)]


ATTENTION_QUERY_CHUNK = 128  # queries per step: a (chunk, S) score block per head stays in cache


def scaled_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(D) + bias) v`` on (B, L, N, D) queries and (B, S, N, D) keys/values.

    ``bias`` broadcasts to (B, N, 1, S), or to (B, N, L, S) for a per-query bias (the unCLIP prior's
    causal mask). On GPU/TPU this is ``jax.nn.dot_product_attention`` (fused kernels); on XLA:CPU it is
    :func:`blocked_attention`, 4x faster there at 4096 tokens (one block under a per-query bias).
    """
    per_query = bias is not None and bias.ndim == 4 and bias.shape[2] != 1
    if per_query and bias.shape[2] != q.shape[1]:
        raise ValueError(f"bias: expected a (B, N, 1 or {q.shape[1]}, S) bias, got shape {tuple(bias.shape)}")
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, bias=bias)
    return blocked_attention(q, k, v, bias, query_chunk=q.shape[1] if per_query else ATTENTION_QUERY_CHUNK)


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, query_chunk: int = 0
) -> jax.Array:
    """Attention with queries in blocks of ``query_chunk`` (default ``ATTENTION_QUERY_CHUNK``) under ``lax.map``:
    the (B, N, L, S) scores are never held at once, each block's stay in cache. Scores and softmax are float32."""
    batch, length, heads, dim = q.shape
    chunk = min(length, query_chunk or ATTENTION_QUERY_CHUNK)
    blocks = -(-length // chunk)
    q = jnp.pad(q * dim**-0.5, ((0, 0), (0, blocks * chunk - length), (0, 0), (0, 0)))  # (B, blocks*chunk, N, D)
    q = q.reshape(batch, blocks, chunk, heads, dim).transpose(1, 0, 3, 2, 4)  # (blocks, B, N, chunk, D)
    k = k.transpose(0, 2, 3, 1)  # (B, N, D, S)
    v = v.transpose(0, 2, 1, 3)  # (B, N, S, D)

    def block(q_block: jax.Array) -> jax.Array:
        scores = jnp.matmul(q_block, k, preferred_element_type=jnp.float32)  # (B, N, chunk, S)
        if bias is not None:
            scores = scores + bias
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)  # (B, N, chunk, D)
        return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)

    out = jax.lax.map(block, q) if blocks > 1 else block(q[0])[None]  # (blocks, B, N, chunk, D)
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, blocks * chunk, heads, dim)  # (B, blocks*chunk, N, D)
    return out[:, :length]  # (B, L, N, D)


class FrozenWeight(nnx.Variable):
    """A weight that is loaded and saved but not trained (torch ``requires_grad=False``)."""


class ParamKeys:
    """Parameter-init keys from one ``nnx.Rngs`` draw and a Python counter; passes for ``rngs`` to NNX layers.

    ``nnx.Rngs`` bumps a counter Variable on every draw. Under ``nnx.eval_shape`` (how checkpoints
    are loaded) each bump costs a scan of the whole trace (jax builds an error message for the
    tracer's missing ``sharding``), so building a large model abstractly becomes quadratic in its
    size. Folding a counter into one key keeps it linear. ``rngs`` is kept for dropout streams.
    """

    def __init__(self, rngs: nnx.Rngs | ParamKeys) -> None:
        self.rngs: nnx.Rngs = rngs.rngs if isinstance(rngs, ParamKeys) else rngs
        self._base = self.rngs.params()
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._base, self._count)


def make_dropout(rate: float, rngs: nnx.Rngs | ParamKeys) -> nnx.Dropout:
    """``nnx.Dropout``; a zero rate (inference, and every pretrained config) needs no RNG stream."""
    if rate == 0.0:
        return nnx.Dropout(rate)
    return nnx.Dropout(rate, rngs=rngs.rngs if isinstance(rngs, ParamKeys) else rngs)


_SHAPE_ONLY = contextvars.ContextVar("diffusion_core_shape_only_init", default=False)


@contextlib.contextmanager
def shape_only_init() -> Iterator[None]:
    """Inside, :func:`conv` and :func:`linear` kernels start from zeros instead of random draws.

    For models built abstractly (``nnx.eval_shape``) to be filled from a checkpoint: tracing a zeros initialiser is
    much cheaper than tracing a random one (the threefry draws), and the values are never used. A context
    variable: other threads building models meanwhile are not affected.
    """
    token = _SHAPE_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPE_ONLY.reset(token)


def _kernel_init(zero: bool) -> dict[str, Callable]:
    return {"kernel_init": nnx.initializers.zeros_init()} if zero or _SHAPE_ONLY.get() else {}


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    stride: int = 1,
    padding: Padding = 1,
    bias: bool = True,
    zero_init: bool = False,
) -> nnx.Conv:
    """A torch-style Conv2d on NHWC: explicit symmetric ``padding`` (int) or per-side pairs.

    ``zero_init``: start from a zero kernel (ControlNet's "zero convolutions").
    """
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    extra = _kernel_init(zero_init)
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=stride,
        padding=pad,
        use_bias=bias,
        **extra,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


def group_norm(channels: int, groups: int, eps: float, rngs: nnx.Rngs, dtype: jnp.dtype) -> nnx.GroupNorm:
    """GroupNorm equal to torch's: biased two-pass variance over (H, W, C / groups), ``eps`` inside the sqrt."""
    return nnx.GroupNorm(
        channels, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, rngs=rngs
    )


def linear(in_f: int, out_f: int, rngs: nnx.Rngs, dtype: jnp.dtype, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs, **_kernel_init(False))


def layer_norm(dim: int, rngs: nnx.Rngs, dtype: jnp.dtype, eps: float = 1e-5) -> nnx.LayerNorm:
    """LayerNorm equal to torch's (biased two-pass variance, affine ``weight``/``bias``)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal timestep projection (diffusers ``Timesteps``)."""

    def __init__(
        self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0
    ) -> None:
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class GaussianFourierProjection(nnx.Module):
    """Random Fourier features of a noise level (score SDE, Song et al. 2021); weight is frozen."""

    def __init__(
        self,
        embedding_size: int = 256,
        scale: float = 1.0,
        log: bool = True,
        flip_sin_to_cos: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        self.weight = FrozenWeight(jax.random.normal(rngs.params(), (embedding_size,), dtype) * scale)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.log:
            x = jnp.log(x)
        proj = x[:, None] * self.weight[...][None, :] * 2 * math.pi  # (B, embedding_size)
        parts = (jnp.cos(proj), jnp.sin(proj)) if self.flip_sin_to_cos else (jnp.sin(proj), jnp.cos(proj))
        return jnp.concatenate(parts, axis=-1)  # (B, 2 * embedding_size)


class TimestepEmbedding(nnx.Module):
    """Two-layer MLP on a timestep projection: ``[+ cond_proj(cond)] -> linear_1 -> act -> linear_2 [-> post_act]``."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        cond_proj_dim: int | None = None,
        post_act_fn: str | None = None,
        out_dim: int | None = None,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ) -> None:
        self.linear_1 = linear(in_channels, time_embed_dim, rngs, dtype)
        self.act = get_activation(act_fn)
        self.linear_2 = linear(time_embed_dim, time_embed_dim if out_dim is None else out_dim, rngs, dtype)
        self.cond_proj = linear(cond_proj_dim, in_channels, rngs, dtype, bias=False) if cond_proj_dim else None
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond: this model has no time_cond_proj_dim")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return sample if self.post_act is None else self.post_act(sample)


class Downsample2D(nnx.Module):
    """Halve H and W: stride-2 3x3 conv (``conv``) or, without a conv, 2x2 average pooling."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        out_channels: int | None = None,
        padding: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ) -> None:
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Downsample2D: average pooling cannot change the channel count")
        # padding=0 means torch's asymmetric (0, 1) pad on bottom and right, then a valid conv
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(channels, out_channels, 3, rngs, dtype, stride=2, padding=pad) if use_conv else None

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        if self.conv is not None:
            return self.conv(hidden_states)
        batch, height, width, channels = hidden_states.shape
        x = hidden_states[:, : height - height % 2, : width - width % 2]  # floor, as torch's AvgPool2d
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)  # (B, H/2, 2, W/2, 2, C)
        return x.mean(axis=(2, 4))  # (B, H/2, W/2, C)


class Upsample2D(nnx.Module):
    """Double H and W by nearest-neighbour repetition, then an optional 3x3 conv (``conv``)."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        out_channels: int | None = None,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ) -> None:
        out_channels = out_channels or channels
        self.conv = conv(channels, out_channels, 3, rngs, dtype) if use_conv else None

    def __call__(self, hidden_states: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """``output_size`` (static (H', W')) resizes by nearest neighbour as torch's ``interpolate(size=...)``."""
        _, height, width, _ = hidden_states.shape
        if output_size is None or tuple(output_size) == (2 * height, 2 * width):
            hidden_states = jnp.repeat(jnp.repeat(hidden_states, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, C)
        else:
            out_h, out_w = output_size
            rows = (jnp.arange(out_h) * height) // out_h  # torch "nearest": floor(dst * in / out)
            cols = (jnp.arange(out_w) * width) // out_w
            hidden_states = hidden_states[:, rows][:, :, cols]  # (B, H', W', C)
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


def _resampler(channels: int, up: bool, down: bool, rngs: nnx.Rngs, dtype: jnp.dtype) -> nnx.Module | None:
    """The conv-free 2x resampler of an ``up``/``down`` resnet, or None."""
    if up:
        return Upsample2D(channels, rngs=rngs, dtype=dtype)
    if down:
        return Downsample2D(channels, rngs=rngs, dtype=dtype)
    return None


class ResnetBlock2D(nnx.Module):
    """Pre-norm residual block with a time embedding added ("default") or as FiLM ("scale_shift")."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        up: bool = False,
        down: bool = False,
        skip_time_act: bool = False,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        if time_embedding_norm not in TIME_SCALE_SHIFTS:
            raise ValueError(
                f"resnet_time_scale_shift: unsupported value {time_embedding_norm!r}; accepted: {TIME_SCALE_SHIFTS}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act  # project temb as is (DeepFloyd IF), not through the nonlinearity
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, rngs, dtype)
        self.conv1 = conv(in_channels, out_channels, 3, rngs, dtype)
        proj_dim = out_channels if time_embedding_norm == "default" else 2 * out_channels
        self.time_emb_proj = linear(temb_channels, proj_dim, rngs, dtype) if temb_channels is not None else None
        self.norm2 = group_norm(out_channels, groups_out or groups, eps, rngs, dtype)
        self.dropout = make_dropout(dropout, rngs)
        self.conv2 = conv(out_channels, out_channels, 3, rngs, dtype)
        self.nonlinearity = get_activation(non_linearity)
        self.resample = _resampler(in_channels, up, down, rngs, dtype)
        self.conv_shortcut = (
            conv(in_channels, out_channels, 1, rngs, dtype, padding=0) if in_channels != out_channels else None
        )

    def __call__(self, input_tensor: jax.Array, temb: jax.Array | None) -> jax.Array:
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.resample is not None:
            input_tensor = self.resample(input_tensor)
            hidden_states = self.resample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None and temb is not None:
            temb = temb if self.skip_time_act else self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, None, None, :]  # (B, 1, 1, C or 2C)
        hidden_states = self._apply_time(hidden_states, temb)
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor

    def _apply_time(self, hidden_states: jax.Array, temb: jax.Array | None) -> jax.Array:
        """Add the projected embedding before ``norm2`` or use it as scale/shift after it."""
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            return self.norm2(hidden_states)
        if temb is None:
            raise ValueError("temb: required when resnet_time_scale_shift is 'scale_shift'")
        scale, shift = jnp.split(temb, 2, axis=-1)  # 2 x (B, 1, 1, C)
        return self.norm2(hidden_states) * (1 + scale) + shift


class SpatialSelfAttention(nnx.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    diffusers builds this as ``Attention(..., residual_connection=True,
    _from_deprecated_attn_block=True)``; the parameter names are the same.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        norm_num_groups: int | None = 32,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        self.heads = channels // head_dim
        if self.heads < 1:
            raise ValueError(f"attention_head_dim: {head_dim} exceeds the channel count {channels}")
        inner_dim = self.heads * head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = group_norm(channels, norm_num_groups, eps, rngs, dtype) if norm_num_groups else None
        self.to_q = linear(channels, inner_dim, rngs, dtype)
        self.to_k = linear(channels, inner_dim, rngs, dtype)
        self.to_v = linear(channels, inner_dim, rngs, dtype)
        self.to_out = nnx.List([linear(inner_dim, channels, rngs, dtype), make_dropout(dropout, rngs)])

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        residual = hidden_states
        batch, height, width, channels = hidden_states.shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        tokens = hidden_states.reshape(batch, height * width, channels)  # (B, HW, C)
        q, k, v = (self._split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = scaled_dot_product_attention(q, k, v)  # (B, HW, heads, head_dim)
        out = out.reshape(batch, height * width, -1)  # (B, HW, inner_dim)
        out = self.to_out[1](self.to_out[0](out))  # (B, HW, C)
        out = out.reshape(batch, height, width, channels)  # (B, H, W, C)
        return (out + residual) / self.rescale_output_factor

    def _split_heads(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1)  # (B, HW, heads, head_dim)


class AdaGroupNorm(nnx.Module):
    """GroupNorm without affine weights, then FiLM from the time embedding: ``x * (1 + scale) + shift``."""

    def __init__(
        self, embedding_dim: int, out_dim: int, num_groups: int, eps: float = 1e-5, *, rngs: nnx.Rngs, dtype: jnp.dtype
    ) -> None:
        self.linear = linear(embedding_dim, 2 * out_dim, rngs, dtype)
        self.norm = nnx.GroupNorm(
            out_dim,
            num_groups=num_groups,
            epsilon=eps,
            use_bias=False,
            use_scale=False,
            use_fast_variance=False,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(emb)[:, None, None, :], 2, axis=-1)  # 2 x (B, 1, 1, C)
        return self.norm(x) * (1 + scale) + shift
