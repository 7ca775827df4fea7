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
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

import torch

from lora_tools.engine.pipeline import OrderedWriter, prefetched
from lora_tools.engine.staging import staging_for
from lora_tools.io.dtypes import FLOAT_DTYPES, torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile
from lora_tools.io.stream_writer import SafetensorsStreamWriter, file_layout

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
    ) -> None:
        self.device = device
        self.computed = computed
        self.compute = compute
        self.out_code = out_code
        self.progress = progress
        self.n_computed = self.n_copied = self.bytes_written = 0
        # Loads alive at once: READ_AHEAD queued or being read, one being computed.
        # Results alive: WRITE_BEHIND queued or being written, one being computed.
        self.staging = staging_for(device, READ_AHEAD + 1, WRITE_BEHIND + 1)

    def _stored_code(self, code: str) -> str:
        return self.out_code if self.out_code is not None and code in FLOAT_DTYPES else code

    def write_files(self, files: list[tuple[SafetensorsFile, Path]]) -> None:
        """Write every (source shard, output file) pair, as one pipeline: the reader and
        the writer run on across shard boundaries instead of draining at each one."""
        if self.progress is not None:
            infos = [src.info(name) for src, _ in files for name, _, _ in file_layout(src)]
            self.progress.start(len(infos), sum(i.nbytes for i in infos))
        layouts = [[(name, self._stored_code(code), shape) for name, code, shape in file_layout(src)] for src, _ in files]
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
