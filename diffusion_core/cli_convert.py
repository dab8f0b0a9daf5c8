"""The ``convert`` subcommand: a CompVis / SD 1.x-2.x single-file checkpoint -> a diffusers pipeline folder.

The single file holds the weights; a reference pipeline of the same architecture (``--config``: a diffusers
folder or Hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``) gives ``model_index.json``, each
component's config, the tokenizer and the scheduler: this library bundles no configs. From the Hub only the
reference's JSON and text files are fetched. The UNet, VAE and text encoder are read through the same
converter as the models' ``from_single_file`` (every key and shape checked from the header before anything
is written); other components with weights of their own (a safety checker) are left out as absent. The
folder is written beside ``DIR`` and renamed into place. ``--verify`` reloads it in both backends and
checks every tensor against the source file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusion_core.atomic import atomic_folder
from diffusion_core.pipelines.hub import resolve_pipeline_configs
from diffusion_core.pipelines.model_index import ComponentSpec, ModelIndex, write_model_index
from diffusion_core.weights import save_state_dict
from diffusion_core.weights.io import file_infos
from diffusion_core.weights.layout import DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME
from diffusion_core.weights.single_file import PICKLE_SUFFIXES, SingleFileComponent, file_components, open_single_file

MODEL_CONFIG = "config.json"  # a component folder holding one has weights (others: tokenizer, scheduler, ...)


def _weights_name(spec: ComponentSpec) -> str:
    return TRANSFORMERS_WEIGHTS_NAME if spec.library == "transformers" else DIFFUSERS_WEIGHTS_NAME


def _copy_configs(source: Path, target: Path) -> None:
    """A component folder's JSON and text files (no weights, no shard index) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in (".json", ".txt") and not path.name.endswith(".index.json"):
            shutil.copyfile(path, target / path.name)


def _open_components(
    checkpoint: Path, reference: Path, index: ModelIndex, extract_ema: bool, allow_pickle: bool
) -> dict[str, SingleFileComponent]:
    """Each component the checkpoint holds (SD: unet, vae, text_encoder; SDXL base adds text_encoder_2, the
    refiner has no text_encoder), validated from the checkpoint's header against the reference's config."""
    held = file_components(checkpoint, allow_pickle)
    missing = [name for name in held if name not in index.components or index.components[name].is_absent]
    if missing:
        raise ValueError(
            f"--config: the reference pipeline {index.class_name} has no {missing}; it must hold {list(held)}"
        )
    opened = {}
    for name in held:
        try:
            opened[name] = open_single_file(
                checkpoint, name, reference / name, extract_ema=extract_ema, allow_pickle=allow_pickle
            )
        except ValueError as err:
            raise ValueError(f"--config: the reference's {name} does not fit {checkpoint.name}: {err}") from err
    return opened


def _check_checkpoint(source: Path, allow_pickle: bool) -> None:
    """The file exists, is not a pickle unless allowed, and has a sound safetensors header."""
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(source)!r}")
    if source.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"checkpoint: {source.name!r} is a pickle checkpoint; pass --allow-pickle to read it "
                "(torch.load with weights_only=True) or convert it to .safetensors"
            )
        return
    try:
        file_infos(source)
    except ValueError as err:
        raise ValueError(f"checkpoint: {err}") from err


def convert(
    checkpoint: str,
    output_dir: str,
    config: str,
    extract_ema: bool = False,
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``checkpoint`` as a diffusers pipeline folder laid out like the reference ``config``; returns it."""
    source, out = Path(checkpoint), Path(output_dir)
    _check_checkpoint(source, allow_pickle)
    if out.exists():
        raise ValueError(f"output_dir: {output_dir!r} already exists; name a new folder")
    try:
        reference, index = resolve_pipeline_configs(config)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--config: {err}") from err
    opened = _open_components(source, reference, index, extract_ema, allow_pickle)
    components, settings = dict(index.components), dict(index.settings)
    with atomic_folder(out) as tmp:
        for name, spec in index.components.items():
            folder = reference / name
            if name in opened:
                _copy_configs(folder, tmp / name)
                tensors = dict(opened[name].tensors("numpy"))
                save_state_dict(tensors, tmp / name, weights_name=_weights_name(spec))
                log(f"{name}: {len(tensors)} tensors")
            elif spec.is_absent or not folder.is_dir():
                components[name] = ComponentSpec(name, None, None)
            elif (folder / MODEL_CONFIG).is_file():  # weights the single file does not hold
                components[name] = ComponentSpec(name, None, None)
                log(f"{name}: not in a single-file checkpoint, left out")
            else:
                _copy_configs(folder, tmp / name)
        if components.get("safety_checker", ComponentSpec("", None, None)).is_absent and (
            "requires_safety_checker" in settings
        ):
            settings["requires_safety_checker"] = False
        write_model_index(ModelIndex(index.class_name, components, settings), tmp)
    return out


def _backend_states(folder: Path, name: str, class_name: str) -> dict[str, dict[str, np.ndarray]]:
    """The component loaded from ``folder`` by each backend, as float32 numpy state dicts (PyTorch layout)."""
    import diffusion_core.flax as flax_backend
    import diffusion_core.torch as torch_backend
    from diffusion_core.flax.models.loading import flax_state_to_torch

    torch_model = getattr(torch_backend, class_name).from_pretrained(folder, subfolder=name)
    flax_model = getattr(flax_backend, class_name).from_pretrained(folder, subfolder=name)
    return {
        "torch": {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()},
        "flax": {k: np.asarray(v, np.float32) for k, v in flax_state_to_torch(flax_model).items()},
    }


def verify(checkpoint: str, output_dir: str, extract_ema: bool = False, allow_pickle: bool = False) -> dict[str, int]:
    """Reload each converted component in torch and in flax and compare every tensor with the source file.

    Returns ``{component: tensors checked}``; ValueError naming the first tensor that differs.
    """
    from diffusion_core.pipelines.model_index import read_model_index

    folder = Path(output_dir)
    index = read_model_index(folder)
    checked = {}
    for name in file_components(checkpoint, allow_pickle):
        states = _backend_states(folder, name, index.components[name].class_name)
        found = open_single_file(checkpoint, name, folder / name, extract_ema=extract_ema, allow_pickle=allow_pickle)
        count = 0
        for key, tensor in found.tensors("numpy"):
            expected = np.asarray(tensor, np.float32)
            for backend, state in states.items():
                if key not in state or not np.array_equal(state[key], expected):
                    raise ValueError(f"--verify: {name} tensor {key!r} loaded by {backend} differs from {checkpoint}")
            count += 1
        for backend, state in states.items():
            if len(state) != count:
                raise ValueError(f"--verify: {name} in {backend} has {len(state)} tensors, the source {count}")
        checked[name] = count
    return checked
