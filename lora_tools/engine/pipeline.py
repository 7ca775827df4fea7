"""Overlapping reads, compute and writes with two helper threads and bounded queues.

A merge is read → compute → write per tensor. Reading the next tensor and writing the
last one while this one is computed hides the compute behind the I/O (and the I/O behind
the GPU). Queues hold at most `depth` items, so memory stays a small multiple of the
largest tensor in flight, whatever the model's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def prefetched(items: Iterable[Item], load: Callable[[Item], Loaded], depth: int = 2) -> Iterator[tuple[Item, Loaded]]:
    """Yield (item, load(item)) in order, loading up to `depth` items ahead on a thread.

    An exception raised by `load` surfaces when its item is reached.
    """
    iterator = iter(items)
    pending: deque[tuple[Item, Future[Loaded]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-tools-read") as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(load, item)))
                if len(pending) > depth:
                    head, future = pending.popleft()
                    yield head, future.result()
            while pending:
                head, future = pending.popleft()
                yield head, future.result()
        finally:
            for _, future in pending:
                future.cancel()


class OrderedWriter:
    """Runs write jobs one after another on a thread, at most `depth` waiting.

    Jobs run in submission order (one worker), which a streaming file needs; `submit`
    blocks while `depth` jobs are queued, bounding the results held in memory.
    """

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-tools-write")
        self._pending: deque[Future[None]] = deque()
        self._depth = depth

    def submit(self, job: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(job))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every job; re-raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
