"""Moving tensors between the files and the compute device, through reused memory.

A merge reads a tensor, computes on it and writes the result, on three threads (see
`pipeline`). What sits between the files and the arithmetic differs by device, and is
all this module does:

- CPU: a tensor is read (pread) into one of a few host buffers that are reused from
  tensor to tensor, and its result is computed into another such buffer that the writer
  thread then writes. Fresh buffers per tensor would cost a page fault (and a zeroed
  page) every 4 KiB, which measured as a quarter of a merge's time on a 2-core VM.
- CUDA: a tensor is read in chunks into two small pinned buffers, each chunk copied to
  the GPU asynchronously while the next is read; results come back the same way, a
  chunk copied off the GPU while the previous one is written. Host memory stays at four
  chunks whatever the tensor's size. All copies and kernels go to the device's one
  current stream, in an order the threads already respect (a tensor is computed after
  it was loaded, written after it was computed), so no cross-stream bookkeeping is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lora_tools.io.checkpoint import SupportsWrite
from lora_tools.io.dtypes import torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile
from lora_tools.io.stream_writer import SafetensorsStreamWriter

# Pinned chunks for host<->GPU copies: large enough that each copy runs at full PCIe
# speed (copies of a few MB already do) and the per-chunk bookkeeping (an event, a
# Python loop turn: tens of µs) stays far under the chunk's disk and PCIe time, small
# enough that the four of them (32 MB) leave room under a 1 GB host budget, of which
# torch with CUDA and cuBLAS initialised takes ~0.72 GB itself (H100 box). The 8B
# H100 timings in docs/benchmarks.md were taken with 32 and 16 MB chunks.
CUDA_CHUNK_BYTES = 8 * 1024 * 1024


class Staging(Protocol):
    """What the merge's threads call; one implementation per kind of device."""

    device: torch.device

    def load(self, src: SafetensorsFile, name: str, reuse: bool = True) -> torch.Tensor:
        """The stored tensor on the compute device (reader thread). reuse=False: a tensor
        met once (a mere dtype conversion), better not kept in reused host memory."""
        ...

    def result_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where the merged tensor may be computed (main thread)."""
        ...

    def write(self, writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> None:
        """Write a computed tensor, which lives on the compute device (writer thread)."""
        ...


class ByteRing:
    """`slots` flat byte buffers on `device`, handed out round-robin, each grown to the
    largest size asked of it; views of them serve tensors of any shape and dtype.

    Large temporaries freed and allocated again come back as fresh zeroed pages (glibc
    maps big blocks directly), which cost a merge millions of page faults; reused
    buffers cost none. The caller must be done with a buffer before the ring comes round
    to it again (`slots` > buffers alive at once).
    """

    def __init__(self, slots: int, device: torch.device | str = "cpu") -> None:
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self.device = torch.device(device)

    def get(self, nbytes: int) -> torch.Tensor:
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buffer[:nbytes]

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next buffer as a tensor of `shape` and `dtype` (contents undefined)."""
        return _as_tensor(self.get(math.prod(shape) * dtype.itemsize), dtype, shape)


def _as_tensor(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return raw.view(dtype).reshape(shape)


class HostStaging:
    """CPU merges: whole tensors in reused host buffers.

    `in_flight_loads` and `in_flight_results` are how many loaded inputs and results
    can be alive at once (queued, being computed or being written): one more slot than
    that would be needed if a buffer could outlive its turn, so the rings hold exactly
    those counts and the pipeline's bounded queues guarantee the rest.
    """

    def __init__(self, in_flight_loads: int, in_flight_results: int) -> None:
        self.device = torch.device("cpu")
        self._inputs = ByteRing(in_flight_loads)
        self._results = ByteRing(in_flight_results)

    def load(self, src: SafetensorsFile, name: str, reuse: bool = True) -> torch.Tensor:
        info = src.info(name)
        if info.numel == 0 or not reuse:
            return src.torch(name)
        return src.torch(name, self._inputs.get(info.nbytes))

    def result_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._results.tensor(shape, dtype)

    def write(self, writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> None:
        writer.write_torch(name, tensor)


@dataclass
class _PinnedChunk:
    """A pinned host buffer and the event that says the GPU is done copying it."""

    buffer: torch.Tensor
    event: Any = field(default=None)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class CudaStaging:
    """GPU merges: chunks through pinned memory, overlapping disk and PCIe transfers."""

    def __init__(self, device: torch.device, chunk_bytes: int | None = None) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes or CUDA_CHUNK_BYTES
        # Two per direction: one being filled (or written) while the other is copied.
        self._inbound = [self._pinned() for _ in range(2)]
        self._outbound = [self._pinned() for _ in range(2)]

    def _pinned(self) -> _PinnedChunk:
        pinned = self.device.type == "cuda"  # (the tests run this class on the CPU too)
        return _PinnedChunk(torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=pinned))

    def _ranges(self, nbytes: int) -> list[tuple[int, int]]:
        return [(lo, min(nbytes, lo + self.chunk_bytes)) for lo in range(0, nbytes, self.chunk_bytes)]

    def load(self, src: SafetensorsFile, name: str, reuse: bool = True) -> torch.Tensor:
        """Through the pinned chunks whatever `reuse` says: the host holds no copy."""
        info = src.info(name)
        dtype = torch_dtype(info.dtype)
        target = torch.empty(info.nbytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.device(self.device):
            for index, (lo, hi) in enumerate(self._ranges(info.nbytes)):
                chunk = self._inbound[index % 2]
                chunk.wait()  # its previous copy to the GPU has finished
                staged = chunk.buffer[: hi - lo]
                src.read_into(name, staged.numpy(), offset=lo)
                target[lo:hi].copy_(staged, non_blocking=True)
                chunk.event = torch.cuda.Event()
                chunk.event.record()
        return _as_tensor(target, dtype, info.shape)

    def result_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def write(self, writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)

        def copy(sink: SupportsWrite) -> None:
            with torch.cuda.device(self.device):
                ranges = self._ranges(raw.numel())
                for index, (lo, hi) in enumerate(ranges[:2]):
                    self._start_copy_back(raw, lo, hi, self._outbound[index % 2])
                for index, (lo, hi) in enumerate(ranges):
                    chunk = self._outbound[index % 2]
                    chunk.wait()
                    sink.write(chunk.buffer[: hi - lo].numpy().data)
                    if index + 2 < len(ranges):  # this chunk is written: reuse it
                        self._start_copy_back(raw, *ranges[index + 2], chunk)

        writer.write_from(name, copy)

    @staticmethod
    def _start_copy_back(raw: torch.Tensor, lo: int, hi: int, chunk: _PinnedChunk) -> None:
        chunk.buffer[: hi - lo].copy_(raw[lo:hi], non_blocking=True)
        chunk.event = torch.cuda.Event()
        chunk.event.record()


def staging_for(device: torch.device, in_flight_loads: int, in_flight_results: int) -> Staging:
    if device.type == "cuda":
        return CudaStaging(device)
    return HostStaging(in_flight_loads, in_flight_results)
