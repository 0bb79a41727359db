"""fae-pipe: Feature Auto-Encoder image generation with cached encoder features.

The library lives here (installed as ``fae_pipe``); stage entry points live in
``fae_pipe.stages``; the command line is ``fae_pipe.cli``.
"""

__version__ = "0.1.0"

from fae_pipe.threads import apply_wait_policy as _apply_wait_policy

_apply_wait_policy()  # before anything imports torch: the OpenMP runtime reads it once (fae_pipe.threads)
