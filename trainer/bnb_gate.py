"""bitsandbytes is imported only when an 8-bit optimizer needs it.

peft and diffusers import bitsandbytes at their own import whenever it is installed (for quantized models, which
no job here loads), and bitsandbytes builds its CPU kernels with torch.compile when imported: ~1.2-2.8 CPU-seconds
of every job's start-up (measured: the engine's imports 5.3-7.5 -> 4.0-4.6 CPU-s). The job processes (the CLI,
the bot's worker) call `defer()` before anything imports them; `load()` (the 8-bit optimizers) lifts it.
Torch-free: importing this module imports nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType


def defer() -> None:
    """Make `import bitsandbytes` (and find_spec) say "not installed" until `load()`; no-op once imported."""
    sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]


def load() -> ModuleType:
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    import bitsandbytes

    return bitsandbytes
