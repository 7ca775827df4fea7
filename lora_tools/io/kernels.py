"""The optional C kernels (`_kernels.c`): loaded once, or None where the package was built
without a C compiler (setup.py builds them with `optional=True`). Each caller keeps a
numpy or torch path that gives the same bits, and takes it when this returns None. And
`in_turn`, which shares work that releases the GIL among threads."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from types import ModuleType
from typing import TypeVar

Result = TypeVar("Result")


@lru_cache(maxsize=1)
def native() -> ModuleType | None:
    """The `_kernels` extension module, or None."""
    try:
        from lora_tools.io import _kernels
    except ImportError:
        return None
    return _kernels


def in_turn(count: int, job: Callable[[int], Result], threads: int) -> list[Result]:
    """[job(i) for i in range(count)], the jobs taken in turn by this thread and up to
    `threads` − 1 helpers: for work that releases the GIL (the kernels, torch's
    operations). A thread that starts late (another's spin-waiting holds its core) just
    takes fewer jobs. An exception in a job is raised here, once the others have ended."""
    taken = itertools.count()  # next() of a count is atomic under the GIL
    results: list[Result | None] = [None] * count

    def work() -> None:
        while (i := next(taken)) < count:
            results[i] = job(i)

    helpers = min(threads, count) - 1
    futures = [_helpers(helpers).submit(work) for _ in range(helpers)] if helpers > 0 else []
    try:
        work()
    finally:
        for future in futures:
            future.exception()  # waits
    for future in futures:
        future.result()
    return results  # type: ignore[return-value]  # (every slot filled)


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size, made once


def _helpers(count: int) -> ThreadPoolExecutor:
    if count not in _POOLS:
        _POOLS[count] = ThreadPoolExecutor(max_workers=count, thread_name_prefix="lora-tools-kernels")
    return _POOLS[count]
