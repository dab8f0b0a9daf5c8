"""A save killed at a random moment (SIGKILL, 20 times) always leaves the previous version, complete and
loadable, or the new one; the next save removes every temporary the killed ones left behind.

The fast test drives the shared mechanism (weights + JSON config, as every ``save_pretrained`` writes);
the slow ones drive each backend's own ``save_pretrained`` of a real model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffusion_core import weights
from diffusion_core.configuration import read_json_config, write_json_atomic
from tests.test_pretrained import UNET

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20

# The child saves version k = start, start + 1, ... of a sharded checkpoint plus its config, printing k
# after each complete save. Every tensor and the config hold k, so a mixed folder is detectable.
CORE_CHILD = """
import sys
import numpy as np
from diffusion_core import weights
from diffusion_core.configuration import config_to_json_string, write_json_atomic
folder, k = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while True:
    state = {f"w{i}": np.full((64, 64), k, np.float32) for i in range(6)}
    weights.save_state_dict(state, folder, max_shard_size="40KB")
    write_json_atomic(folder + "/config.json", config_to_json_string({"version": k}))
    print(k, flush=True)
    k += 1
"""


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}


def _run_and_kill(code: str, folder: Path, first: int, delay: float) -> list[int]:
    """Start the child saving versions ``first, first + 1, ...``, SIGKILL it after ``delay`` seconds;
    returns the versions it reported complete."""
    args = [sys.executable, "-c", code, str(folder), str(first)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=_child_env())
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    completed = [int(line) for line in child.stdout.read().split()]
    child.wait()
    child.stdout.close()
    return completed


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.tmp-")) + sorted(
        p.name for p in folder.iterdir() if ".tmp-" in p.name
    )


def _check_core(folder: Path) -> int:
    tensors = weights.load_tensors(folder)
    values = {float(a[0, 0]) for a in tensors.values()} | {float(a.mean()) for a in tensors.values()}
    assert len(values) == 1 and len(tensors) == 6, values  # one version, complete
    return int(values.pop())


def test_killed_saves_leave_a_loadable_version_and_no_temporaries(tmp_path):
    folder = tmp_path / "model"
    weights.save_state_dict({f"w{i}": np.zeros((64, 64), np.float32) for i in range(6)}, folder, max_shard_size="40KB")
    (folder / "config.json").write_text('{"version": 0}')
    rng, previous, previous_config, first, seen = np.random.default_rng(0), 0, 0, 1, set()
    for _ in range(KILLS):
        completed = _run_and_kill(CORE_CHILD, folder, first, float(rng.uniform(0.0, 0.4)))
        version = _check_core(folder)  # complete, one version
        last = completed[-1] if completed else first - 1
        # the folder holds the version before this child, or one this child wrote (a save can finish its
        # atomic swap after the last line it printed, hence last + 1)
        assert version == previous or first <= version <= last + 1, (version, previous, first, completed)
        config_version = read_json_config(folder, "config.json")["version"]  # written after the weights
        assert previous_config <= config_version <= version
        previous, previous_config, first = version, config_version, max(last + 1, version) + 1
        seen.add(version)
    assert len(seen) > 2  # saves really completed between kills
    weights.save_state_dict({f"w{i}": np.ones((64, 64), np.float32) for i in range(6)}, folder, max_shard_size="40KB")
    write_json_atomic(folder / "config.json", '{"version": 1}')
    assert _temporaries(folder) == []
    assert _check_core(folder) == 1


BACKEND_CHILD = """
import sys
from diffusion_core.{backend}.models import UNet2DModel
UNET = {unet!r}
folder, rounds = sys.argv[1], int(sys.argv[2])
model = UNet2DModel.from_config(UNET)
print("ready", flush=True)
while rounds != 0:
    model.save_pretrained(folder, max_shard_size="20KB")
    print(rounds, flush=True)
    rounds -= 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_killed_save_pretrained_per_backend(tmp_path, backend):
    if backend == "torch":
        from diffusion_core.torch.models import UNet2DModel
    else:
        from diffusion_core.flax.models import UNet2DModel
    folder, code = tmp_path / "unet", BACKEND_CHILD.format(backend=backend, unet=UNET)
    once = [sys.executable, "-c", code, str(folder), "1"]
    subprocess.run(once, check=True, env=_child_env(), capture_output=True)
    rng = np.random.default_rng(1)
    for _ in range(KILLS):
        _run_and_kill(code, folder, -1, float(rng.uniform(0.0, 0.5)))  # -1: save until killed
        model = UNet2DModel.from_pretrained(folder)  # strict: a missing or partial shard is an error
        assert model.config["sample_size"] == 8
    subprocess.run(once, check=True, env=_child_env(), capture_output=True)
    assert _temporaries(folder) == []
    UNet2DModel.from_pretrained(folder)
