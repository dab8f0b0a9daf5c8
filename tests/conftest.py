"""Test-wide settings: CPU only, float32, fixed thread counts (machines here are shared)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch  # noqa: E402
except ImportError:  # nox -s compat_oracle: diffusers 0.39's Flax environment holds no torch
    torch = None
else:
    torch.set_num_threads(1)
