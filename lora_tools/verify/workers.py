"""verify's row blocks on several threads, each with buffers of its own.

Why threads of our own rather than torch's intra-op threads: a block is ~256 K elements
and ~30 operations, each too small for torch to split well over two cores (measured on
the 2-core box: 1.0-1.3× over one thread, and far slower than one thread whenever the
other core is busy, since every operation waits for its slowest thread), while two
blocks on two threads, each operation single-threaded, run side by side (torch releases
the GIL inside its kernels, and reads are `pread`s). So the blocks of one tensor are
dealt out in turn to `count` workers, each with its own `BlockReader` and `Workspace`
(the buffers are reused, never shared), and each adds up its own `Sums`, which the
caller folds together (`Sums.add`).

While the workers run, torch works single-threaded (one thread per worker, no nested
team); outside `run` the process keeps its thread count, so the whole-tensor check of
other layers (DoRA, embeddings) still uses every core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lora_tools.verify.block_math import Workspace
from lora_tools.verify.reader import BlockReader
from lora_tools.verify.screen import ScreenSpace

# Each worker holds ~17 MB of buffers at 1B shapes; four stay under verify's memory
# target (≤ 400 MB peak RSS at 1B) and use a 4-core machine fully.
MAX_WORKERS = 4


@dataclass(eq=False)
class Worker:
    """One thread's buffers: raw reads and block arithmetic; index: its place in the pool."""

    index: int
    reader: BlockReader = field(default_factory=BlockReader)
    workspace: Workspace = field(default_factory=Workspace)
    screen: ScreenSpace = field(default_factory=ScreenSpace)


def default_count() -> int:
    """As many workers as torch would use threads (the physical cores), at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch on one thread in the calling thread (and MKL's global count), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BlockWorkers:
    """`count` workers; the calling thread is the first, the others live in a pool."""

    def __init__(self, count: int | None = None) -> None:
        self.workers = [Worker(index) for index in range(count or default_count())]
        self._pool = (
            ThreadPoolExecutor(len(self.workers) - 1, thread_name_prefix="verify-block", initializer=torch.set_num_threads, initargs=(1,))
            if len(self.workers) > 1
            else None
        )

    def reserve(self, elements: int) -> None:
        for worker in self.workers:
            worker.workspace.reserve(elements)

    def run(self, blocks: Sequence[tuple[int, int]], job: Callable[[Worker, int, int], bool]) -> None:
        """job(worker, lo, hi) for every block, block i on worker i mod count. A job that
        returns False (a NaN or an Inf: the caller falls back to the whole-tensor check)
        stops every worker at its next block. Exceptions reach the caller."""
        stop = threading.Event()

        def deal(index: int) -> None:
            worker = self.workers[index]
            for lo, hi in blocks[index :: len(self.workers)]:
                if stop.is_set():
                    return
                if not job(worker, lo, hi):
                    stop.set()

        with single_threaded_torch():
            if self._pool is None:
                deal(0)
                return
            futures = [self._pool.submit(deal, index) for index in range(1, len(self.workers))]
            try:
                deal(0)
            except BaseException:
                stop.set()
                raise
            finally:
                for future in futures:
                    future.exception()  # wait for all, whatever happened here
            for future in futures:
                future.result()  # re-raise a worker's exception

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
