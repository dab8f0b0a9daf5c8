"""Framework-neutral half of ``from_pretrained``/``save_pretrained``: folders, Hub snapshots, config.json, layouts.

A ``path_or_repo_id`` is a local folder (used as is) or a Hub repo id, fetched with
``huggingface_hub.snapshot_download`` restricted to the config and the requested weight files
(``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself). A ``CheckpointLayout`` says how a
model class's folder looks on disk: diffusers' (``diffusion_pytorch_model.safetensors``,
``_class_name``) or transformers' (``model.safetensors``, ``architectures``/``model_type``, and
the key-prefix rules of checkpoints older transformers wrote). ``CheckpointLayout.open_pretrained``
and ``open_single_file`` (a CompVis single file) both give a ``CheckpointSource``: config, header
infos and a tensor stream, the one input of each backend's loader. Backends build the model and
load tensors; this module never imports torch or jax.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

from diffusion_core.configuration import (
    DIFFUSERS_FORMAT_VERSION,
    config_to_json_string,
    read_json_config,
    write_json_atomic,
)
from diffusion_core.weights.flax_msgpack import (
    DIFFUSERS_FLAX_WEIGHTS_NAME,
    TRANSFORMERS_FLAX_WEIGHTS_NAME,
    read_flax_msgpack,
)
from diffusion_core.weights.hub import CONFIG_NAME, resolve_flax_weights, resolve_pretrained_folder
from diffusion_core.weights.io import (
    Converter,
    TensorInfo,
    cast_tensor,
    converted,
    iter_tensors,
    nonfinite_mask,
    numpy_dtype,
    numpy_to_framework,
    tensor_infos,
)
from diffusion_core.weights.layout import (
    DIFFUSERS_WEIGHTS_NAME,
    TRANSFORMERS_WEIGHTS_NAME,
    WeightFiles,
    resolve_weight_files,
)
from diffusion_core.weights.safetensors_header import InvalidCheckpointError
from diffusion_core.weights.single_file import (
    ALL_COMPONENTS,
    SINGLE_FILE_COMPONENTS,
    open_single_file,
    read_component_config,
)

# The transformers release whose config.json we write (and test against).
TRANSFORMERS_FORMAT_VERSION = "5.24.0"
V = TypeVar("V")


def load_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (``_``-prefixed keys included)."""
    return read_json_config(folder, CONFIG_NAME)


def save_model_config(config: Mapping[str, Any], folder: str | os.PathLike, class_name: str) -> Path:
    """Write ``config.json`` byte-for-byte as diffusers does (``_class_name``, ``_diffusers_version``)."""
    data = {k: v for k, v in config.items() if not k.startswith("_")}
    data["_class_name"] = class_name
    data["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
    path = Path(folder) / CONFIG_NAME
    write_json_atomic(path, config_to_json_string(data))
    return path


def save_transformers_config(
    config: Mapping[str, Any], folder: str | os.PathLike, class_name: str, model_type: str, dtype_name: str
) -> Path:
    """Write ``config.json`` as transformers 5 does: ``architectures``, ``model_type``, ``dtype``, version."""
    data = {k: v for k, v in config.items() if not k.startswith("_")}
    data.update(
        architectures=[class_name],
        model_type=model_type,
        dtype=dtype_name,
        transformers_version=TRANSFORMERS_FORMAT_VERSION,
    )
    path = Path(folder) / CONFIG_NAME
    write_json_atomic(path, config_to_json_string(data))
    return path


class CheckpointSource(NamedTuple):
    """What a backend's loader needs, from either a pretrained folder or a single file, before any weight is read.

    ``infos`` maps every model key to ``(dtype name, shape)`` from the file headers; ``tensors(framework,
    dtype, convert=None, workers=1)`` then streams ``(model key, tensor)`` (``framework`` ``"numpy"``/``"pt"``/
    ``"flax"``, ``dtype`` None keeps the stored one). ``convert(model key, array)`` (numpy only): the stream
    yields its results instead; ``array`` may view a memory map dropped once ``convert`` returns, and
    safetensors files are mapped and converted on ``workers`` threads (``iter_tensors``). ``files``: the weight
    files the tensors are read from, exactly (a pretrained folder's); empty where the stream is not the files'
    tensors as stored (a single file's component, a finite-checked stream). A cache of converted weights keys on
    them and serves only sources that name them.
    """

    name: str  # where the weights come from, for error messages
    config: dict[str, Any]
    infos: dict[str, TensorInfo]
    tensors: Callable[..., Iterator[tuple[str, Any]]]
    files: tuple[Path, ...] = ()


def finite_checked(source: CheckpointSource) -> CheckpointSource:
    """``source`` whose tensor stream raises InvalidCheckpointError at the first NaN or inf value."""

    def check(key: str, tensor: Any) -> Any:
        if nonfinite_mask(tensor).any():
            raise InvalidCheckpointError(f"{source.name}: tensor {key!r} holds NaN or inf values")
        return tensor

    def tensors(framework: str, dtype: Any, convert: Converter | None = None, workers: int = 1) -> Iterator[Any]:
        if convert is None:
            return ((key, check(key, tensor)) for key, tensor in source.tensors(framework, dtype))
        return source.tensors(framework, dtype, lambda key, array: convert(key, check(key, array)), workers)

    return source._replace(tensors=tensors, files=())  # every value must be read to be checked: never from a cache


class PretrainedFiles(NamedTuple):
    """What ``from_pretrained`` reads: the model folder, its ``config.json`` and its weight files."""

    folder: Path
    config: dict[str, Any]
    files: WeightFiles


@dataclass(frozen=True)
class CheckpointLayout:
    """How one model class lies on disk: weight file name, config style, and checkpoint key rules.

    ``model_type`` None means diffusers' layout; a string means transformers' (the ``model_type``
    its ``config.json`` carries). ``strip_prefix``: older writers saved every key of this model
    under that prefix (transformers 4 saved a bare ``CLIPTextModel`` as ``text_model.*``); it is
    removed on loading. ``dropped_keys``: keys (after stripping) older writers saved that are not
    weights (non-persistent buffers such as ``embeddings.position_ids``); they are ignored, and so
    are keys under ``dropped_prefixes`` (the decoder of a full T5 checkpoint read by its encoder).
    ``tied_keys``: ``(alias, name)`` pairs of tied weights some writers save under both names
    (``encoder.embed_tokens.weight`` of T5 is ``shared.weight``); the alias loads as the name, and when
    both are present the second one read is skipped. ``keep_in_float32``: module names whose
    weights stay float32 when the model loads in float16 (transformers' ``_keep_in_fp32_modules``).
    Every other key must match the model exactly.
    """

    weights_name: str = DIFFUSERS_WEIGHTS_NAME
    model_type: str | None = None
    strip_prefix: str = ""
    dropped_keys: frozenset[str] = frozenset()
    dropped_prefixes: tuple[str, ...] = ()
    tied_keys: tuple[tuple[str, str], ...] = ()
    keep_in_float32: tuple[str, ...] = ()

    def model_key(self, key: str) -> str | None:
        """The model's name for a checkpoint key, or None when the key is to be ignored."""
        if self.strip_prefix and key.startswith(self.strip_prefix):
            key = key[len(self.strip_prefix) :]
        if key in self.dropped_keys or any(key.startswith(prefix) for prefix in self.dropped_prefixes):
            return None
        return dict(self.tied_keys).get(key, key)

    def converter(self, convert: Converter) -> Converter:
        """``convert`` (called with model keys) as a converter called with checkpoint keys: ignored keys give None."""

        def named(key: str, array: Any) -> Any:
            name = self.model_key(key)
            return None if name is None else convert(name, array)

        return named

    def rename(self, items: Iterable[tuple[str, V]]) -> Iterator[tuple[str, V]]:
        """Stream ``(checkpoint_key, value)`` as ``(model_key, value)``; ValueError on two keys for one name
        (except a tied weight saved under both its names: the second is skipped)."""
        seen: dict[str, str] = {}
        tied = {name for _, name in self.tied_keys}
        for key, value in items:
            name = self.model_key(key)
            if name is None:
                continue
            if name in seen:
                if name in tied:
                    continue
                raise ValueError(f"checkpoint holds both {seen[name]!r} and {key!r}, which name the same weight")
            seen[name] = key
            yield name, value

    def weight_dtype(self, key: str, dtype_name: str) -> str:
        """The dtype a weight named ``key`` loads in when the model loads in ``dtype_name``."""
        if dtype_name == "float16" and any(part in self.keep_in_float32 for part in key.split(".")):
            return "float32"
        return dtype_name

    def locate(
        self,
        path_or_repo_id: str | os.PathLike,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        allow_pickle: bool = False,
    ) -> PretrainedFiles:
        """Find the folder (downloading from the Hub if needed), read and check its config, find the weights.

        ``.bin`` (pickle) weights are refused with a FileNotFoundError unless ``allow_pickle``.
        """
        if not isinstance(allow_pickle, bool):
            raise ValueError(f"allow_pickle must be True or False, got {allow_pickle!r}")
        folder = resolve_pretrained_folder(
            path_or_repo_id,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
            weights_name=self.weights_name,
            allow_pickle=allow_pickle,
        )
        config = load_model_config(folder)
        self.check_config(config, repr(str(folder / CONFIG_NAME)))
        files = resolve_weight_files(folder, weights_name=self.weights_name, variant=variant, allow_pickle=allow_pickle)
        return PretrainedFiles(folder, config, files)

    def check_config(self, config: Mapping[str, Any], where: str) -> None:
        """ValueError when ``config`` declares a transformers ``model_type`` other than this layout's."""
        found_type = config.get("model_type")
        if self.model_type is not None and found_type is not None and found_type != self.model_type:
            raise ValueError(
                f"config: {where} has model_type {found_type!r}; this class reads {self.model_type!r} checkpoints"
            )

    def open_pretrained(self, path_or_repo_id: str | os.PathLike, **locate_kwargs: Any) -> CheckpointSource:
        """``locate`` (same keyword arguments), then the model keys and shapes from the weight headers.

        Shard indexes are validated against their shards here, so streaming does not do it again.
        """
        try:
            found = self.locate(path_or_repo_id, **locate_kwargs)
        except FileNotFoundError:
            flax_file = resolve_flax_weights(
                path_or_repo_id,
                self.flax_weights_name,
                subfolder=locate_kwargs.get("subfolder"),
                revision=locate_kwargs.get("revision"),
                local_files_only=locate_kwargs.get("local_files_only", False),
            )
            if flax_file is None:
                raise
            return self.open_flax_msgpack(flax_file)
        infos = dict(self.rename(tensor_infos(found.files).items()))

        def tensors(framework: str, dtype: Any, convert: Converter | None = None, workers: int = 1) -> Iterator[Any]:
            named = None if convert is None else self.converter(convert)
            files = found.files
            return self.rename(
                iter_tensors(files, framework=framework, dtype=dtype, validate=False, convert=named, workers=workers)
            )

        return CheckpointSource(f"checkpoint {str(found.folder)!r}", found.config, infos, tensors, found.files.files)

    @property
    def flax_weights_name(self) -> str:
        """The Flax checkpoint file of this layout (diffusers' or transformers')."""
        return DIFFUSERS_FLAX_WEIGHTS_NAME if self.model_type is None else TRANSFORMERS_FLAX_WEIGHTS_NAME

    def open_flax_msgpack(self, file: Path) -> CheckpointSource:
        """A folder holding Flax msgpack weights (diffusers <= 0.39, transformers' Flax models) and ``config.json``."""
        config = load_model_config(file.parent)
        self.check_config(config, repr(str(file.parent / CONFIG_NAME)))
        state = dict(self.rename(read_flax_msgpack(file).items()))  # renamed through the one converter, checked
        infos: dict[str, TensorInfo] = {key: (array.dtype.name, tuple(array.shape)) for key, array in state.items()}

        def tensors(framework: str, dtype: Any, convert: Converter | None = None, workers: int = 1) -> Iterator[Any]:
            target = None if dtype is None else numpy_dtype(dtype)  # a numpy dtype or "bfloat16", as iter_tensors
            items = ((k, cast_tensor(numpy_to_framework(a, framework), target, framework)) for k, a in state.items())
            return converted(items, convert)

        return CheckpointSource(f"Flax checkpoint {str(file)!r}", config, infos, tensors)

    def open_single_file(
        self,
        path: str | os.PathLike,
        component: str,
        config: Mapping[str, Any] | str | os.PathLike,
        *,
        subfolder: str | None = None,
        extract_ema: bool = False,
        allow_pickle: bool = False,
    ) -> CheckpointSource:
        """One ``component`` of a CompVis single-file checkpoint, checked from its header against ``config``.

        ``config``: a dict, a ``config.json``, or a folder holding one (``subfolder`` inside it).
        """
        where = "the config given" if isinstance(config, Mapping) else repr(str(config))
        config = read_component_config(config, subfolder)
        self.check_config(config, where)
        found = open_single_file(path, component, config, extract_ema=extract_ema, allow_pickle=allow_pickle)
        infos = dict(self.rename(found.infos.items()))

        def tensors(framework: str, dtype: Any, convert: Converter | None = None, workers: int = 1) -> Iterator[Any]:
            return converted(self.rename(found.tensors(framework, dtype)), convert)  # read tensor by tensor

        return CheckpointSource(f"single-file checkpoint {str(found.path)!r}", config, infos, tensors)

    def save_config(
        self, config: Mapping[str, Any], folder: str | os.PathLike, class_name: str, dtype_name: str
    ) -> Path:
        """Write ``config.json`` in this layout's style (``dtype_name``: the saved weights' dtype)."""
        if self.model_type is None:
            return save_model_config(config, folder, class_name)
        return save_transformers_config(config, folder, class_name, self.model_type, dtype_name)


DIFFUSERS_LAYOUT = CheckpointLayout()
# transformers' CLIP text encoders. transformers 4 saved a bare CLIPTextModel under ``text_model.``
# (transformers 5 does not) and, before 4.31, the ``position_ids`` buffer too.
CLIP_TEXT_LAYOUT = CheckpointLayout(
    TRANSFORMERS_WEIGHTS_NAME,
    model_type="clip_text_model",
    strip_prefix="text_model.",
    dropped_keys=frozenset({"embeddings.position_ids"}),
)
CLIP_TEXT_PROJECTION_LAYOUT = CheckpointLayout(
    TRANSFORMERS_WEIGHTS_NAME,
    model_type="clip_text_model",
    dropped_keys=frozenset({"text_model.embeddings.position_ids"}),
)
# transformers' T5EncoderModel: transformers 5 saves the tied token embedding once, as ``shared.weight``;
# older writers (DeepFloyd IF's text encoders) may also hold ``encoder.embed_tokens.weight``; a full T5
# checkpoint's decoder and LM head are ignored, as transformers does.
T5_ENCODER_LAYOUT = CheckpointLayout(
    TRANSFORMERS_WEIGHTS_NAME,
    model_type="t5",
    dropped_prefixes=("decoder.", "lm_head."),
    tied_keys=(("encoder.embed_tokens.weight", "shared.weight"),),
    keep_in_float32=("wo",),
)


class CheckpointModel:
    """Framework-neutral half of both backends' ``PretrainedMixin``: where a model class's weights come from.

    ``checkpoint_layout``: how its folder looks (diffusers' by default). ``single_file_component``:
    the part of a CompVis single file it reads; it defaults, per subclass, to
    ``SINGLE_FILE_COMPONENTS[class name]`` (a class body may set it); None: no single-file form.
    """

    checkpoint_layout: ClassVar[CheckpointLayout] = DIFFUSERS_LAYOUT
    single_file_component: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "single_file_component" not in cls.__dict__ and cls.__name__ in SINGLE_FILE_COMPONENTS:
            cls.single_file_component = SINGLE_FILE_COMPONENTS[cls.__name__]

    @classmethod
    def pretrained_source(
        cls, path_or_repo_id: str | os.PathLike, check_finite: bool = False, **locate_kwargs: Any
    ) -> CheckpointSource:
        """``checkpoint_layout.open_pretrained`` (the arguments of ``CheckpointLayout.locate``); with
        ``check_finite`` every floating tensor is checked for NaN/inf as it streams in."""
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be a bool, got {check_finite!r}")
        source = cls.checkpoint_layout.open_pretrained(path_or_repo_id, **locate_kwargs)
        return finite_checked(source) if check_finite else source

    @classmethod
    def single_file_source(
        cls, path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike, **kwargs: Any
    ) -> CheckpointSource:
        """This class's component of a CompVis single file (``subfolder``, ``extract_ema``, ``allow_pickle``)."""
        if cls.single_file_component not in ALL_COMPONENTS:
            raise ValueError(
                f"{cls.__name__} cannot be loaded from a single file (single_file_component="
                f"{cls.single_file_component!r}); classes that can: {sorted(SINGLE_FILE_COMPONENTS)}"
            )
        return cls.checkpoint_layout.open_single_file(path, cls.single_file_component, config, **kwargs)
