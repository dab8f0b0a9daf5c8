"""One installed top-level package: the wheel holds only ``diffusion_core`` (backends inside), plain and
editable installs import the backends as ``diffusion_core.torch`` / ``diffusion_core.flax``, and importing the
core loads no framework."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source folder is, per pyproject's package-dir mapping.
SOURCE_ROOTS = {"diffusion_core": "diffusion_core", "diffusion_core.torch": "backends/torch"}
SOURCE_ROOTS["diffusion_core.flax"] = "backends/flax"
FRAMEWORKS = ("torch", "jax", "flax", "jaxlib")


def _run(code: str, cwd: Path, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (outside the repository unless ``cwd`` is it); returns stdout."""
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _source_packages() -> set[str]:
    """Every package folder in the repository, under its installed name."""
    found = set()
    for name, folder in SOURCE_ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    return found


def _folder(package: str) -> Path:
    """The repository folder an installed package comes from."""
    root = max((r for r in SOURCE_ROOTS if package == r or package.startswith(r + ".")), key=len)
    return ROOT / SOURCE_ROOTS[root] / Path(*package[len(root) :].split(".")[1:])


def test_pyproject_lists_every_package_folder_under_its_installed_name():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == SOURCE_ROOTS
    assert set(tool["packages"]) == _source_packages()
    assert not (ROOT / "backends" / "__init__.py").exists()  # a source folder, never a package


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (setuptools writes build/ beside the sources it builds)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("diffusion_core", "backends"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, cwd=src, env={**os.environ, "PIP_NO_INPUT": "1"})
    (path,) = out.glob("diffusion_core-*.whl")
    return path


def test_wheel_holds_one_top_level_package_with_the_backends_inside(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"diffusion_core"}
    sources = {"/".join((*pkg.split("."), py.name)) for pkg in _source_packages() for py in _folder(pkg).glob("*.py")}
    assert sources and sources <= set(names)
    assert "diffusion_core/torch/__init__.py" in names and "diffusion_core/flax/pipelines/__init__.py" in names
    assert "diffusion_core/assets/digits/unet/diffusion_pytorch_model.safetensors" in names  # the shipped model
    assert not any(n.startswith(("backends/", "tests/")) for n in names)


def test_plain_install_imports_the_backends_under_the_core(wheel, tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(pip, check=True, cwd=tmp_path)
    code = (
        "import diffusion_core, diffusion_core.torch, diffusion_core.flax\n"
        "print(diffusion_core.torch.__file__); print(diffusion_core.flax.__file__)\n"
        "from diffusion_core.torch import UNet2DConditionModel\n"
        "from diffusion_core.flax import StableDiffusionPipeline\n"
        "print(UNet2DConditionModel.__module__, StableDiffusionPipeline.__module__)"
    )
    torch_file, flax_file, modules = _run(code, tmp_path, PYTHONPATH=str(target)).splitlines()
    assert Path(torch_file) == target / "diffusion_core" / "torch" / "__init__.py"
    assert Path(flax_file) == target / "diffusion_core" / "flax" / "__init__.py"
    assert modules.split() == [
        "diffusion_core.torch.models.unet_2d_condition",
        "diffusion_core.flax.pipelines.stable_diffusion",
    ]


def test_installed_package_resolves_backends_from_outside_the_repository(tmp_path):
    """The test environment's own install (editable under nox) maps the backends to backends/torch and /flax."""
    code = (
        "import json, diffusion_core.torch as t, diffusion_core.flax as f; print(json.dumps([t.__file__, f.__file__]))"
    )
    torch_file, flax_file = json.loads(_run(code, tmp_path))
    assert Path(torch_file).name == Path(flax_file).name == "__init__.py"
    assert Path(torch_file).parent.name == "torch" and Path(flax_file).parent.name == "flax"
    if Path(torch_file).resolve().is_relative_to(ROOT):  # editable: the repository's folders
        assert Path(torch_file).resolve() == ROOT / "backends" / "torch" / "__init__.py"


def test_no_top_level_backends_package_is_installed(tmp_path):
    code = "import importlib.util; print(importlib.util.find_spec('backends'))"
    assert _run(code, tmp_path) == "None"


def test_importing_the_core_loads_no_framework(tmp_path):
    code = (
        "import sys, diffusion_core, diffusion_core.schedulers, diffusion_core.pipelines, diffusion_core.weights\n"
        "import diffusion_core.models, diffusion_core.tokenizers, diffusion_core.configuration\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    assert _run(code, tmp_path) == "[]"
