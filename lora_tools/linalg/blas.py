"""numpy's BLAS thread count, set for a block of work (no torch, no I/O beyond /proc)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

# OpenBLAS entry points to get/set its thread count, as numpy's wheels (scipy-openblas,
# 64-bit ints) and system builds name them.
_OPENBLAS_THREADS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with numpy's OpenBLAS on one thread, and restore it after.

    Why: a factored blend is thousands of small products (8192×24 by 24×24), for which
    OpenBLAS's thread hand-offs cost more than they save: equal on an idle two-core
    machine, 2-3× slower on a busy one (its threads spin-wait). OPENBLAS_NUM_THREADS
    only acts before numpy's import, so the thread count is set through the library's
    own API (found in the process's loaded libraries, as threadpoolctl does). Anything
    else (another BLAS, another OS) is left as it is.
    """
    controls = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for get_name, set_name in _OPENBLAS_THREADS:
                if hasattr(lib, get_name) and hasattr(lib, set_name):
                    getter, setter = getattr(lib, get_name), getattr(lib, set_name)
                    getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                    controls.append((setter, getter()))
                    setter(1)
                    break
    try:
        yield
    finally:
        for setter, threads in controls:
            setter(threads)


def import_numpy_for_own_threads() -> None:
    """Import numpy with OpenBLAS loaded at one thread, unless something imported it already.

    Why: OpenBLAS starts its server threads when it is loaded, and they spin-wait about
    0.1 s of CPU before they sleep, whether or not BLAS ever runs on them; on a 2-core
    machine that is the core our own threads wanted (resize lost ~0.05 s of its 0.6 s
    wall to it). Only a command whose BLAS all runs in `single_threaded_blas` pools may
    call this: its OpenBLAS then never has a thread to hand work to. The thread count is
    read from the environment at load only, so the variable is restored right after.
    """
    if "numpy" in sys.modules:
        return
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        if before is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = before
