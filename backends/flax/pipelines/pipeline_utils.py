"""``DiffusionPipeline`` for Flax NNX: component classes, pipeline registry, compiled-program cache and scale-out.

A pipeline's denoising program is traced once per (shapes, static options): programs are cached by
mode, mesh, network graph, scheduler config and step options, and jax caches each per input shapes.
``parallel="pmap"`` splits the batch over ``jax.local_devices()``; ``mesh=`` shards it with ``NamedSharding``
under ``jax.jit`` over the mesh's ``"data"`` axis, and with a ``"model"`` axis also splits the network weights
(FSDP-style, for networks larger than one device's memory). Per-image keys make the images independent of either.
A batch that does not divide the devices is padded with copies of its last image and trimmed. Across processes
(``jax.distributed``, see :func:`diffusion_core.flax.initialize_distributed`), every process makes the same call
with a mesh over ``jax.devices()``, feeds its own devices, and gets the whole batch back (write the images on
process 0 only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusion_core.configuration import config_to_json_string
from diffusion_core.flax.compilation import compile_timer
from diffusion_core.flax.lora import FlaxLoraLayers
from diffusion_core.flax.sampling import ScanProgress
from diffusion_core.pipelines import ComponentClass, PipelineBase
from diffusion_core.pipelines.components import backend_component_table, backend_pipeline_registry

logger = logging.getLogger(__name__)

# model_index.json class name -> where the Flax class lives (imported only when a pipeline needs it).
FLAX_COMPONENTS: dict[str, ComponentClass] = backend_component_table("diffusion_core.flax.models")

# model_index.json "_class_name" -> pipeline class (DDPM/DDIM here, Stable Diffusion in .stable_diffusion).
FLAX_PIPELINES: dict[str, str] = backend_pipeline_registry("diffusion_core.flax.pipelines")

# Program signature: ((params, scalars), scheduler_state, batch (B, ...), keys (B,)) -> batch output. ``params``
# (network weights) are placed once per pipeline and reused; ``scalars`` (guidance scales) travel with each call.
Program = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]

DATA_AXIS = "data"  # the mesh axis a batch is split over
PARAM_AXIS = "model"  # optional mesh axis the network weights are split over (FSDP-style), batch replicated on it
MESH_AXES = ((DATA_AXIS,), (DATA_AXIS, PARAM_AXIS))


def scale_out_mode(parallel: str | None, mesh: Mesh | None) -> str:
    """``"single"``, ``"pmap"`` or ``"mesh"`` from the call's ``parallel=``/``mesh=`` arguments."""
    if parallel not in (None, "pmap"):
        raise ValueError(f"parallel must be None or 'pmap', got {parallel!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if parallel is not None and mesh is not None:
        raise ValueError("parallel/mesh: pass one of parallel='pmap' or mesh=, not both")
    if parallel == "pmap" and jax.process_count() > 1:
        raise ValueError(
            f"parallel: 'pmap' spreads a batch over one process's devices; with {jax.process_count()} processes "
            f"pass mesh=jax.make_mesh((jax.device_count(),), ({DATA_AXIS!r},)) instead"
        )
    if mesh is not None and tuple(mesh.axis_names) not in MESH_AXES:
        raise ValueError(
            f"mesh: axes must be {MESH_AXES[0]} (the batch split over {DATA_AXIS!r}) or {MESH_AXES[1]} (the weights "
            f"also split over {PARAM_AXIS!r}), e.g. jax.make_mesh((n,), ({DATA_AXIS!r},)); "
            f"got a mesh with axes {dict(mesh.shape)}"
        )
    return "pmap" if parallel == "pmap" else ("mesh" if mesh is not None else "single")


def pad_batch(x: jax.Array, multiple: int) -> jax.Array:
    """(B, ...) -> (B + p, ...) with ``p`` copies of the last row, ``B + p`` the next multiple of ``multiple``.

    A batch that does not divide the device count is padded so and the extra images are dropped after the run;
    they cost compute, never change the kept images (each row carries its own key and inputs).
    """
    extra = -x.shape[0] % multiple
    return x if not extra else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in ``Auto`` mode: XLA propagates the batch sharding through the program.

    (``jax.make_mesh`` makes ``Explicit`` axes, under which reshapes of sharded arrays need hand-written shardings.)
    """
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def weight_sharding(mesh: Mesh, weight: Any) -> NamedSharding:
    """A weight's placement on ``mesh``: its largest dimension divisible by the ``"model"`` axis split over it
    (FSDP-style: each device holds a slice, XLA gathers it where used); replicated without that axis."""
    spec = [None] * len(weight.shape)
    parts = dict(mesh.shape).get(PARAM_AXIS, 1)
    fits = [d for d in range(len(weight.shape)) if weight.shape[d] % parts == 0 and weight.shape[d] >= parts]
    if parts > 1 and fits:
        spec[max(fits, key=lambda d: weight.shape[d])] = PARAM_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def put_global(tree: Any, sharding: NamedSharding | Callable[[Any], NamedSharding]) -> Any:
    """``tree``'s arrays placed with ``sharding`` (or ``sharding(array)`` per array). Across processes
    (``jax.distributed``) every process holds the same whole arrays and fills the shards of its own devices (typed
    keys travel as their raw key data)."""
    where = sharding if callable(sharding) else (lambda a: sharding)

    def put(a):
        if jax.process_count() == 1:
            return jax.device_put(a, where(a))
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, where(a), lambda index: host[index])

    return jax.tree.map(put, tree)


def _device_stack() -> NamedSharding:
    """The placement ``jax.pmap`` takes its mapped inputs in: axis 0 split over ``jax.local_devices()``."""
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("devices",)), PartitionSpec("devices"))


def _replicate(params: Any, mode: str, mesh: Mesh | None) -> Any:
    """Network weights placed for ``mode``: a (devices, ...) stack over ``jax.local_devices()`` for ``pmap``
    (one transfer per device); on ``mesh``, :func:`weight_sharding` (replicated unless it has a ``"model"`` axis)."""
    if mode == "mesh":
        mesh = auto_mesh(mesh)
        return put_global(params, lambda a: weight_sharding(mesh, a))
    devices = jax.local_devices()
    stacked = _device_stack()

    def put(a):
        shards = [jax.device_put(a[None], d) for d in devices]  # (1, ...) on each device
        return jax.make_array_from_single_device_arrays((len(devices),) + a.shape, stacked, shards)

    return jax.tree.map(put, params)


class DiffusionPipeline(FlaxLoraLayers, PipelineBase):
    """Base of the Flax pipelines; ``DiffusionPipeline.from_pretrained`` picks the class from the folder.

    LoRA (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...): ``diffusion_core.pipelines.lora``; the
    factors and adapter weights are inputs of the compiled programs (``diffusion_core.flax.lora``).
    """

    _component_table = FLAX_COMPONENTS
    _pipeline_registry = FLAX_PIPELINES

    def __init__(self, **components: Any) -> None:
        super().__init__(**components)
        self.trace_count = 0  # times a denoising program was traced (diagnostics: should not grow per call)
        self._programs: dict[Hashable, tuple[Any, Callable]] = {}
        self._placed: dict[Hashable, tuple[list, Any]] = {}  # (mode, mesh) -> (weights as given, weights placed)
        self.last_compile_seconds = 0.0  # compile time of the last call's denoising program (0.0: cached)
        self._progress = ScanProgress()
        self._ahead_of_time = False  # inside ``compile``: programs are lowered and compiled, not run
        self._pmap_executables: dict[Hashable, Callable] = {}  # ``compile``'s pmap programs, by program and inputs

    def _scheduler_key(self) -> tuple[str, str]:
        return type(self.scheduler).__name__, config_to_json_string(self.scheduler.config)

    def compiled(
        self, mode: str, mesh: Mesh | None, static: Hashable, build: Callable[[], Program], network: Any = None
    ) -> Callable:
        """The cached compiled program for ``(mode, mesh, network, static)``; ``build()`` makes it on a miss.

        The network (``self.unet`` unless given: multi-network pipelines pass the stage's own) is keyed by identity
        (NNX graph definitions hold configs and are not hashable) and by the layout of its LoRA layers (not their
        values); the entry keeps the network alive so the identity cannot be reused.
        """
        network = self.unet if network is None else network
        key = (mode, mesh, id(network), self.lora_structure(), static)
        entry = self._programs.get(key)
        if entry is None or entry[0] is not network:
            program = build()
            fn = jax.pmap(program, in_axes=((0, None), None, 0, 0)) if mode == "pmap" else jax.jit(program)
            entry = self._programs[key] = (network, fn)
        return entry[1]

    def _placeholder_call(self, batch_size: int) -> dict[str, Any]:
        """The call arguments ``compile`` fills in for a batch of ``batch_size`` images (before the caller's own)."""
        return {"batch_size": batch_size}

    def compile(self, batch_size: int = 1, **call_kwargs: Any) -> float:
        """Compile ahead of time what a call of this shape runs, so the first such call does not compile (serving).

        ``call_kwargs`` are the call's own arguments that fix shapes and static options: ``height``/``width``,
        ``num_inference_steps``, ``guidance_scale`` (guidance on or off), ``num_images_per_prompt``,
        ``parallel``/``mesh``, an ``image`` of the size to serve, ... Later calls with the same shapes and options
        and any prompt, seed or guidance scale reuse the programs. The denoising program is traced, lowered and
        compiled (``jax.jit(program).lower(*args).compile()``) without running; the text encoder and VAE, which
        compile on first use, run once on placeholder inputs. Returns the seconds spent compiling the denoising
        program (also ``last_compile_seconds``; 0.0 when it was compiled already). With
        :func:`~diffusion_core.flax.enable_compilation_cache` the compiled programs also serve later processes.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        call = {**self._placeholder_call(batch_size), "key": jax.random.key(0), "output_type": "np", **call_kwargs}
        self._ahead_of_time = True
        try:
            self(**call)
        finally:
            self._ahead_of_time = False
        return self.last_compile_seconds

    def _execute(self, fn: Callable, mode: str, *args: Any) -> Any:
        """``fn(*args)``; inside ``compile``, ``fn`` lowered and compiled for ``args`` instead, and zeros of its output.

        ``jax.jit`` keeps what ``lower(...).compile()`` made and finds it on the first real call; ``jax.pmap`` does
        not, so its executables are kept here, by program and input shapes, and called directly.
        """
        key = (id(fn), jax.tree.structure(args), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if not self._ahead_of_time:
            return self._pmap_executables.get(key, fn)(*args)
        compiled = fn.lower(*args).compile()
        if mode == "pmap":
            self._pmap_executables[key] = compiled
            jax.block_until_ready(jax.device_put(args, compiled.input_shardings[0]))  # compiles the input split
        # placed as the real output is, so what follows the program (reshapes, slices) compiles here too
        return jax.tree.map(lambda info: jnp.zeros(info.shape, info.dtype, device=info.sharding), compiled.out_info)

    def progress_for_trace(self) -> ScanProgress | None:
        """The progress object a traced loop should tick (None when the bar is disabled)."""
        return None if self.progress_bar_disabled else self._progress

    def placed_params(self, mode: str, mesh: Mesh | None, params: Any) -> Any:
        """``params`` placed for ``mode``, once per pipeline: reused while the weights are the same arrays."""
        if mode == "single":
            return params
        leaves = jax.tree.leaves(params)
        cached = self._placed.get((mode, mesh))
        if cached is not None and len(cached[0]) == len(leaves):
            if all(a is b for a, b in zip(cached[0], leaves, strict=True)):
                return cached[1]
        placed = _replicate(params, mode, mesh)
        self._placed[(mode, mesh)] = (leaves, placed)
        return placed

    def run_program(
        self, fn: Callable, mode: str, mesh: Mesh | None, params: Any, scalars: Any, make_state: Callable, x, keys
    ) -> jax.Array:
        """Run a compiled program over batch ``x`` (B, ...) with per-image typed ``keys`` (B,) in ``mode``.

        ``make_state(like)`` builds the scheduler state for a per-program batch shaped as ``like``. Under ``pmap``
        / ``mesh`` a batch that does not divide the device count is padded (:func:`pad_batch`) and trimmed.
        The compile time of this call (0.0 when the program was cached) lands in ``last_compile_seconds``.
        """
        batch = x.shape[0]
        placed = self.placed_params(mode, mesh, params)
        with compile_timer() as timer:
            if mode == "pmap":
                n = jax.local_device_count()
                x, keys = pad_batch(x, n), pad_batch(keys, n)
                xs = x.reshape((n, x.shape[0] // n) + x.shape[1:])  # (devices, B/devices, ...)
                # inputs made from arrays the caller committed to one device (jax.device_put) stay there; pmap
                # takes its mapped inputs split over the devices and its broadcast ones uncommitted (host)
                state, scalars = jax.device_get((make_state(xs[0]), scalars))
                xs, keys = jax.device_put((xs, keys.reshape((n, x.shape[0] // n))), _device_stack())
                out = self._execute(fn, mode, (placed, scalars), state, xs, keys)
                out = out.reshape((x.shape[0],) + out.shape[2:])
            elif mode == "mesh":
                mesh = auto_mesh(mesh)
                x, keys = pad_batch(x, mesh.shape[DATA_AXIS]), pad_batch(keys, mesh.shape[DATA_AXIS])
                rows, whole = NamedSharding(mesh, PartitionSpec(DATA_AXIS)), NamedSharding(mesh, PartitionSpec())
                state = put_global(make_state(x), whole)
                x, keys = put_global(x, rows), put_global(keys, rows)
                out = self._execute(fn, mode, (placed, put_global(scalars, whole)), state, x, keys)
                if jax.process_count() > 1:  # every process gets the whole batch
                    out = multihost_utils.process_allgather(out, tiled=True)
            else:
                out = self._execute(fn, mode, (placed, scalars), make_state(x), x, keys)
            out = jax.block_until_ready(out)
        self.last_compile_seconds = timer.seconds
        if timer.seconds:
            logger.info("%s: compiled the %s denoising program in %.2f s", type(self).__name__, mode, timer.seconds)
        return out[:batch]
