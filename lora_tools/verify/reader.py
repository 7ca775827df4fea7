"""Raw reads of tensor bytes into buffers that live for the whole verify.

Why not `SafetensorsFile.torch`: it allocates a fresh buffer per tensor, and on this
kind of VM the page faults of fresh allocations cost more than reading the bytes.
`BlockReader` reads byte ranges (`SafetensorsFile.read_into`, positional reads, safe
from several threads at once) into buffers it keeps, one per slot, so a 1B verify
touches a few MiB of memory instead of gigabytes, and each block arrives in cache right
before its passes. One reader per thread: its buffers are not shared.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_tools.io.dtypes import torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile, TensorInfo


class BlockReader:
    """Reads into byte buffers reused across tensors, one per slot."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.Tensor, memoryview]] = {}

    def _buffer(self, slot: int, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        held = self._buffers.get(slot)
        if held is None or held[0].numel() < nbytes:
            raw = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            held = (raw, raw.numpy().data)
            self._buffers[slot] = held
        return held

    def read(self, shard: SafetensorsFile, info: TensorInfo, first: int, nbytes: int, slot: int) -> torch.Tensor:
        """Bytes [first, first + nbytes) of the tensor's data, as a uint8 view of slot's buffer."""
        raw, view = self._buffer(slot, nbytes)
        shard.read_into(info.name, view[:nbytes], offset=first)
        return raw[:nbytes]

    def rows(self, shard: SafetensorsFile, info: TensorInfo, lo: int, hi: int, width: int, slot: int) -> torch.Tensor:
        """Rows [lo, hi) of a tensor of `width` elements per row, flat, in its stored dtype."""
        itemsize = torch_dtype(info.dtype).itemsize
        raw = self.read(shard, info, lo * width * itemsize, (hi - lo) * width * itemsize, slot)
        return raw.view(torch_dtype(info.dtype))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two uint8 tensors hold the same bytes: compared as 8-byte words where the length
    allows (numpy: ~30 GB/s here, where torch.equal on bytes managed 1-3 GB/s)."""
    if a.numel() != b.numel():
        return False
    x, y = a.numpy(), b.numpy()
    words = x.size // 8 * 8
    if not np.array_equal(x[:words].view(np.uint64), y[:words].view(np.uint64)):
        return False
    return bool(np.array_equal(x[words:], y[words:]))
