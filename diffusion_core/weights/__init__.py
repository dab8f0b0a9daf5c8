"""Framework-neutral checkpoint I/O in diffusers' on-disk layout (safetensors, shards, variants).

Also the reader of original CompVis / SD 1.x-2.x single-file checkpoints (``single_file``).
Importing this package loads numpy and safetensors only; torch, jax and ml_dtypes are imported
by the calls that need them (``framework="pt"``/``"flax"``, bfloat16, ``allow_pickle=True``).
"""

from diffusion_core.weights.io import (
    FRAMEWORKS,
    as_numpy,
    capped,
    cast_tensor,
    check_keys,
    file_infos,
    from_torch,
    iter_tensors,
    load_tensors,
    numpy_dtype,
    read_pickle_state_dict,
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
from diffusion_core.weights.safetensors_header import InvalidCheckpointError, read_header
from diffusion_core.weights.save import plan_shards, save_state_dict
from diffusion_core.weights.single_file import (
    SINGLE_FILE_COMPONENTS,
    SingleFileComponent,
    detect_model_type,
    file_components,
    iter_single_file,
    load_single_file,
    open_single_file,
    read_component_config,
    single_file_infos,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DIFFUSERS_WEIGHTS_NAME",
    "FRAMEWORKS",
    "InvalidCheckpointError",
    "SINGLE_FILE_COMPONENTS",
    "SingleFileComponent",
    "TRANSFORMERS_WEIGHTS_NAME",
    "WeightFiles",
    "add_variant",
    "as_numpy",
    "capped",
    "cast_tensor",
    "check_keys",
    "detect_model_type",
    "file_components",
    "file_infos",
    "from_torch",
    "index_name",
    "iter_single_file",
    "iter_tensors",
    "load_single_file",
    "load_tensors",
    "numpy_dtype",
    "open_single_file",
    "parse_size",
    "plan_shards",
    "read_component_config",
    "read_index",
    "read_header",
    "read_pickle_state_dict",
    "resolve_weight_files",
    "save_state_dict",
    "shard_name",
    "single_file_infos",
    "tensor_infos",
    "validate_index",
]
