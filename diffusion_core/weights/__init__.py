"""Framework-neutral checkpoint I/O in diffusers' on-disk layout (safetensors, shards, variants).

Importing this package loads numpy and safetensors only; torch, jax and ml_dtypes are imported
by the calls that need them (``framework="pt"``/``"flax"``, bfloat16, ``allow_pickle=True``).
"""

from diffusion_core.weights.io import (
    FRAMEWORKS,
    as_numpy,
    check_keys,
    file_infos,
    iter_tensors,
    load_tensors,
    numpy_dtype,
    tensor_infos,
    validate_index,
)
from diffusion_core.weights.layout import (
    DEFAULT_MAX_SHARD_SIZE,
    DIFFUSERS_WEIGHTS_NAME,
    TRANSFORMERS_WEIGHTS_NAME,
    WeightFiles,
    add_variant,
    index_name,
    parse_size,
    read_index,
    resolve_weight_files,
    shard_name,
)
from diffusion_core.weights.save import plan_shards, save_state_dict

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DIFFUSERS_WEIGHTS_NAME",
    "FRAMEWORKS",
    "TRANSFORMERS_WEIGHTS_NAME",
    "WeightFiles",
    "add_variant",
    "as_numpy",
    "check_keys",
    "file_infos",
    "index_name",
    "iter_tensors",
    "load_tensors",
    "numpy_dtype",
    "parse_size",
    "plan_shards",
    "read_index",
    "resolve_weight_files",
    "save_state_dict",
    "shard_name",
    "tensor_infos",
    "validate_index",
]
