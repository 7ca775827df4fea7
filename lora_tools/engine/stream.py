"""The public streaming engine: read → compute → write across the shards of a checkpoint.

merge uses it today; unmerge, extract and quantized merges plug in their own `compute`.
Every tensor of the source files is written in the same order and layout: those the
caller computes go through `compute`, the others are copied as raw bytes (or only
converted, when the output dtype differs). Three threads: the reader loads the tensors
to compute (up to READ_AHEAD ahead), the calling thread computes, the writer writes
results and copies the untouched tensors (in the kernel). The staging (see `staging`)
decides where tensors live meanwhile: reused host buffers, or pinned chunks on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

import torch

from lora_tools.engine.pipeline import OrderedWriter, prefetched
from lora_tools.engine.staging import staging_for
from lora_tools.errors import RequestError
from lora_tools.io.dtypes import FLOAT_DTYPES, torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile
from lora_tools.io.stream_writer import Entry, SafetensorsStreamWriter, file_layout

# Tensors loaded ahead of the one being computed, and results queued for the writer.
# The writer waits on the disk in bursts (a shard's untouched tensors, the disk's own
# stalls); a deep queue lets the computation run on meanwhile instead of waiting with
# it. Measured at 1B shapes on 2 cores: 3.0 s with 2, 2.5 s with 6-8. Memory: on the
# CPU, WRITE_BEHIND + 1 results of at most the largest computed tensor each.
READ_AHEAD = 2
WRITE_BEHIND = 6


class Progress(Protocol):
    """Where a long operation reports how far it got (the CLI draws a bar)."""

    def start(self, total_tensors: int, total_bytes: int) -> None: ...

    def advance(self, tensors: int, nbytes: int) -> None: ...


# compute(name, w0 on the device in its stored dtype, dtype to store, out buffer of that
# dtype and w0's shape) -> the tensor to write (normally `out`, filled).
Compute = Callable[[str, torch.Tensor, torch.dtype, torch.Tensor], torch.Tensor]


class TensorStream:
    """Streams (source shard, output file) pairs; counts what it did."""

    def __init__(
        self,
        device: torch.device,
        computed: Collection[str],
        compute: Compute,
        out_code: str | None = None,
        progress: Progress | None = None,
        *,
        out_codes: Mapping[str, str] | None = None,
        dropped: Collection[str] = (),
        reorder: Callable[[list[Entry]], list[Entry]] | None = None,
    ) -> None:
        """`out_codes`: the stored dtype of particular tensors (a dequantized FP8 weight),
        before `out_code`'s rule; `dropped`: tensors left out of the output (FP8 scales);
        `reorder`: the order a file's tensors are computed and written in (by default
        the source's)."""
        self.reorder = reorder
        self.device = device
        self.computed = computed
        self.compute = compute
        self.out_code = out_code
        self.out_codes = out_codes or {}
        self.dropped = dropped
        self.progress = progress
        self.n_computed = self.n_copied = self.bytes_written = 0
        # Loads alive at once: READ_AHEAD queued or being read, one being computed.
        # Results alive: WRITE_BEHIND queued or being written, one being computed.
        self.staging = staging_for(device, READ_AHEAD + 1, WRITE_BEHIND + 1)

    def _stored_code(self, name: str, code: str) -> str:
        if name in self.out_codes:
            return self.out_codes[name]
        return self.out_code if self.out_code is not None and code in FLOAT_DTYPES else code

    def _layout(self, src: SafetensorsFile) -> list[Entry]:
        entries: list[Entry] = [
            (name, self._stored_code(name, code), tuple(shape)) for name, code, shape in file_layout(src) if name not in self.dropped
        ]
        return entries if self.reorder is None else self.reorder(entries)

    def write_files(self, files: list[tuple[SafetensorsFile, Path]]) -> None:
        """Write every (source shard, output file) pair, as one pipeline: the reader and
        the writer run on across shard boundaries instead of draining at each one."""
        layouts = [self._layout(src) for src, _ in files]
        if self.progress is not None:
            infos = [src.info(name) for (src, _), entries in zip(files, layouts) for name, _, _ in entries]
            self.progress.start(len(infos), sum(i.nbytes for i in infos))
        items = [(index, name) for index, entries in enumerate(layouts) for name, _, _ in entries]
        last_of_file = {(index, entries[-1][0]) for index, entries in enumerate(layouts) if entries}
        codes = [{name: code for name, code, _ in entries} for entries in layouts]

        def load(item: tuple[int, str]) -> torch.Tensor | None:
            index, name = item
            src = files[index][0]
            if name not in self.computed and codes[index][name] == src.info(name).dtype:
                return None  # copied as is, by the writer
            # a dtype change only: not worth growing the reused buffers to a 500 MB embedding
            return self.staging.load(src, name, reuse=name in self.computed)

        with contextlib.ExitStack() as open_files, OrderedWriter(WRITE_BEHIND) as jobs:
            writers: dict[int, SafetensorsStreamWriter] = {}
            for index, (src, dst) in enumerate(files):
                if not layouts[index]:  # a shard without tensors: its header is all there is
                    with SafetensorsStreamWriter(dst, [], src.metadata):
                        pass
            for (index, name), w0 in prefetched(items, load, READ_AHEAD):
                src, dst = files[index]
                if index not in writers:
                    writers[index] = open_files.enter_context(SafetensorsStreamWriter(dst, layouts[index], src.metadata))
                writer = writers[index]
                if w0 is None:
                    jobs.submit(self._copy_job(writer, src, name, src.info(name).nbytes))
                    self.n_copied += 1
                else:
                    stored = torch_dtype(codes[index][name])
                    if name in self.computed:
                        result = self.compute(name, w0, stored, self.staging.result_buffer(tuple(w0.shape), stored))
                        self.n_computed += 1
                    else:  # only a dtype change
                        result = w0.to(stored)
                        if may_overflow(w0.dtype, stored) and not all_finite(result):
                            refuse_overflow(src.path, name, w0, result)
                        self.n_copied += 1
                    jobs.submit(self._write_job(writer, name, result))
                if (index, name) in last_of_file:
                    jobs.submit(writer.close)  # fsync on the writer thread, in order

    def _copy_job(self, writer: SafetensorsStreamWriter, src: SafetensorsFile, name: str, nbytes: int) -> Callable[[], None]:
        def job() -> None:
            writer.copy_tensor(name, src)
            self._advance(nbytes)

        return job

    def _write_job(self, writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> Callable[[], None]:
        def job() -> None:
            self.staging.write(writer, name, tensor)
            self._advance(tensor.numel() * tensor.element_size())

        return job

    def _advance(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        if self.progress is not None:
            self.progress.advance(1, nbytes)


# -- results past the stored dtype's range ---------------------------------------------
# Rounding to a dtype of narrower range (float32 -> float16, also -> bfloat16 at the very
# top of float32's range) turns a finite value into ±Inf without a word. The engine and
# merge check such results with one reduction per tensor (`all_finite`); only a tensor
# that fails it is looked at element by element, to say where and whose fault it is.


def may_overflow(source: torch.dtype, stored: torch.dtype) -> bool:
    """Can rounding a finite `source` value to `stored` give ±Inf? Only when `stored`'s
    largest finite value is below `source`'s (a value at most stored's largest rounds to
    at most it)."""
    return (
        source.is_floating_point and stored.is_floating_point
        and torch.finfo(stored).max < torch.finfo(source).max
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±Inf in `tensor`: one reduction (min and max, which NaN propagates to),
    in the tensor's own dtype, so it cannot overflow as a sum can."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))  # one device sync


def first_new_non_finite(source: torch.Tensor, result: torch.Tensor) -> list[int] | None:
    """Index of the first element that is finite in `source` but not in `result` (same
    shape), or None: an element-wise pass, for tensors that failed `all_finite`."""
    bad = (torch.isfinite(source) & ~torch.isfinite(result)).reshape(-1).nonzero()
    if not bad.numel():
        return None
    flat = int(bad[0])
    index = []
    for size in reversed(result.shape):
        flat, at = divmod(flat, size)
        index.append(at)
    return index[::-1]


def refuse_overflow(path: str | os.PathLike[str], name: str, source: torch.Tensor, result: torch.Tensor) -> None:
    """Raise if `result` (`source` rounded to its dtype) holds ±Inf or NaN where `source`
    was finite, naming the tensor, the value and the file (`path`) it comes from. A
    non-finite value that was already in `source` is passed on as it is."""
    where = first_new_non_finite(source, result)
    if where is None:
        return
    value = float(source[tuple(where)])
    dtype = str(result.dtype).removeprefix("torch.")
    raise RequestError(
        path,
        f"tensor {name!r} holds {value:.6g} at {where}, past the largest {dtype} value "
        f"{torch.finfo(result.dtype).max:.6g}: storing it as {dtype} would make it "
        f"{'-' if value < 0 else ''}inf; use a dtype of wider range (e.g. --dtype bf16 or fp32)",
    )
