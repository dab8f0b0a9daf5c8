"""diffusion_core: the framework-neutral core of a diffusers-compatible diffusion library.

Nothing here imports torch, jax or flax at import time: scheduler math runs on whatever
array namespace its inputs come from (numpy, torch or jax), and the backends in
``diffusion_core.flax`` / ``diffusion_core.torch`` bind it to their networks and loop drivers.
"""

from diffusion_core import schedulers
from diffusion_core.configuration import DIFFUSERS_FORMAT_VERSION

__version__ = "0.1.0"

__all__ = ["DIFFUSERS_FORMAT_VERSION", "__version__", "schedulers"]
