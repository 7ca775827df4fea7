"""The optional C kernels (`_kernels.c`): loaded once, or None where the package was built
without a C compiler (setup.py builds them with `optional=True`). Each caller keeps a
numpy or torch path that gives the same bits, and takes it when this returns None."""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType


@lru_cache(maxsize=1)
def native() -> ModuleType | None:
    """The `_kernels` extension module, or None."""
    try:
        from lora_tools.io import _kernels
    except ImportError:
        return None
    return _kernels
