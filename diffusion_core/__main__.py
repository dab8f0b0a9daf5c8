"""``python -m diffusion_core``: the ``diffusion-core`` command line."""

import sys

from diffusion_core.cli import main

sys.exit(main())
