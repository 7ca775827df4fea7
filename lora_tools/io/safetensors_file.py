"""A validating, lazy reader for the safetensors format, with numpy as its currency.

Why our own reader instead of `safetensors.safe_open`: numpy has no bfloat16, so
safe_open(framework="numpy") refuses most adapters; torch would cost ~1.3 s of import on
every `inspect`; and we want every problem reported with the file's name before any
tensor is read. The format (8-byte little-endian header length, a JSON header of
name -> {dtype, shape, data_offsets}, then the raw bytes) is small enough to own. The
header's checks are `safetensors_header`'s; this module does the reading.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.errors import FormatError
from lora_tools.io.dtypes import NUMPY_DTYPE
from lora_tools.io.encode import bf16_to_float32
from lora_tools.io.safetensors_header import MAX_HEADER_BYTES, TensorInfo, parse_header, require_valid_unicode

__all__ = ["SafetensorsFile", "TensorInfo", "open_regular", "pread_into", "require_valid_unicode"]

_SEEK_LOCK = threading.Lock()

# Elements widened at a time (bf16 → float32): small enough that a chunk overlapping its
# own input costs numpy only a cache-sized copy.
_WIDEN_CHUNK = 1 << 16


def _stat_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"  # ELOOP: a symlink loop


def open_regular(path: str | os.PathLike[str], expected: str = "a file") -> int:
    """A read-only descriptor of `path`, which must be a regular file (links followed).

    `os.stat` comes first, so a FIFO (whose open blocks until someone writes) or a device
    (/dev/zero never ends) is never opened; the open itself is non-blocking and checked
    again with fstat, in case the file was swapped in between. FormatError names `path`.
    """
    try:
        before = os.stat(path)
    except OSError as exc:
        raise FormatError(path, _stat_problem(exc)) from None
    if stat.S_ISDIR(before.st_mode):
        raise FormatError(path, f"is a directory, expected {expected}")
    if not stat.S_ISREG(before.st_mode):
        raise FormatError(path, "not a regular file")
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FormatError(path, _stat_problem(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(path, "not a regular file")
        if nonblock:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """One positional read into `view` (0 at the end of the file).

    pread needs no shared file offset, so threads may read one descriptor at once. Where
    os.preadv is missing (Windows) it is seek + read under a lock, which is as safe.
    """
    if hasattr(os, "preadv"):
        return int(os.preadv(fd, [view], offset))
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


class SafetensorsFile:
    """An opened, validated safetensors file; tensors are read only when asked for.

    The header is checked completely on open (sizes, offsets, dtypes, overlaps), so a
    corrupt file fails before any work is done, with the file named in the error.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._mapping: mmap.mmap | None = None  # `mapped`'s, made on first use
        self._unmappable = False  # mmap refused: `mapped` reads
        self._map_lock = threading.Lock()
        self.header_size, self.tensors, self.metadata = self._read_header()

    # -- header -------------------------------------------------------------------
    def _fail(self, problem: str) -> FormatError:
        return FormatError(self.path, problem)

    def _read_header(self) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
        fd = open_regular(self.path, "a .safetensors file")
        try:
            with os.fdopen(fd, "rb") as handle:
                file_size = os.fstat(handle.fileno()).st_size
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._fail(f"not a safetensors file ({file_size} bytes, too short for a header)")
                header_len = int.from_bytes(prefix, "little")
                if header_len > file_size - 8:
                    raise self._fail(
                        f"truncated or not safetensors: header length {header_len} runs past the end of the file ({file_size} bytes)"
                    )
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail(f"header length {header_len} is implausibly large")
                raw_header = handle.read(header_len)
        except OSError as exc:
            raise self._fail(f"cannot read: {exc.strerror or exc}") from None
        tensors, metadata = parse_header(self.path, raw_header, 8 + header_len, file_size - 8 - header_len)
        return header_len, tensors, metadata

    # -- data ---------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._fail(f"no tensor named {name!r}") from None

    def _descriptor(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                self._fd = open_regular(self.path, "a .safetensors file")  # never a FIFO swapped in
            return self._fd

    def fileno(self) -> int:
        """A read-only descriptor of the file (kept open until `close`), for positional
        reads and in-kernel copies."""
        return self._descriptor()

    def close(self) -> None:
        self._mapping = None  # (views of it keep it mapped: they hold the mmap object)
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_into(self, name: str, buffer: Any, offset: int = 0) -> None:
        """Fill `buffer` (writable) with the tensor's stored bytes from `offset` on.

        Threads may read from one file at once (`pread_into`); a caller that reuses its
        buffers spares the page faults a fresh allocation costs for every tensor.
        """
        info = self.info(name)
        view = memoryview(buffer).cast("B")
        if offset < 0 or offset + view.nbytes > info.nbytes:
            raise ValueError(f"tensor {name!r} has {info.nbytes} bytes, asked for {view.nbytes} from {offset}")
        self._read_fully(view, info.start + offset, f"tensor {name!r}")

    def _read_fully(self, view: memoryview, position: int, what: str) -> None:
        fd = self._descriptor()
        done = 0
        while done < view.nbytes:
            try:
                got = pread_into(fd, view[done:], position + done)
            except OSError as exc:
                raise self._fail(f"cannot read {what}: {exc.strerror or exc}") from None
            if got == 0:
                raise self._fail(f"{what}: file ended early (truncated?)")
            done += got

    def read_span(self, names: list[str]) -> tuple[np.ndarray, int]:
        """The bytes from the first of these tensors to the end of the last, in one array,
        and the file offset it starts at (`numpy_from` takes both): one read instead of one
        per tensor, for files of many small ones (a LoHa file's 3,500). The memory is
        anonymous and populated up front (MAP_POPULATE, where there is one): one call
        faults its pages in, 0.07 s for 168 MB here, against 0.1–0.15 s of faults taken one
        by one, or up to 0.4 s when numpy's huge-page request on such an array makes the
        kernel compact memory."""
        infos = [self.info(name) for name in names]
        start, end = min(i.start for i in infos), max(i.end for i in infos)
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(mmap, "MAP_POPULATE", 0)
        memory = mmap.mmap(-1, max(1, end - start), flags=flags) if flags else mmap.mmap(-1, max(1, end - start))
        span = np.frombuffer(memory, dtype=np.uint8)[: end - start]
        self._read_fully(span.data, start, f"tensors {names[0]!r} to {names[-1]!r}")
        return span, start

    def numpy_from(self, name: str, span: np.ndarray, span_start: int) -> np.ndarray:
        """`numpy(name)` from a `read_span` holding it: a view of those bytes (BF16: widened
        into a new float32 array)."""
        info, storage = self._storage(name)
        raw = span[info.start - span_start:info.end - span_start].view(storage)
        return (bf16_to_float32(raw) if info.dtype == "BF16" else raw).reshape(info.shape)

    def will_need(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now, in large requests, so
        that the small reads that follow find them in memory (a file not yet in the page
        cache, such as a merge just written with direct I/O). A hint: no-op where
        unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        info = self.info(name)
        try:
            os.posix_fadvise(self._descriptor(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def read_bytes(self, name: str) -> bytearray:
        """The tensor's raw little-endian bytes, exactly as stored, in a new buffer."""
        buffer = bytearray(self.info(name).nbytes)
        self.read_into(name, buffer)
        return buffer

    def numpy(self, name: str) -> np.ndarray:
        """The tensor as a numpy array; BF16 is widened exactly to float32.

        bf16 is the top half of an IEEE float32, so shifting its uint16 bits left by 16
        gives the same value as float32 with no rounding.
        """
        info, _ = self._storage(name)
        if info.dtype == "BF16":
            return self._bf16_as_float32(name, info.numel).reshape(info.shape)
        return self.stored(name)

    def stored(self, name: str) -> np.ndarray:
        """The tensor's stored values as a numpy array of its storage type: uint16 bit
        patterns for BF16 (half the memory of `numpy`'s widened copy), the float itself
        for the others."""
        info, storage = self._storage(name)
        array = np.empty(info.numel, dtype=storage)  # not a zero-filled bytearray: one pass
        self.read_into(name, array)
        return array.reshape(info.shape)

    def mapped(self, name: str) -> np.ndarray:
        """`stored(name)` as a read-only view of the file mapped into memory: no copy, no
        fresh pages, the page cache's own pages instead (a 90 MB adapter: 20 K fewer page
        faults and ~0.03 s less to read). The view keeps the mapping alive after `close`.

        For a reader of small files that is done in seconds (resize reads adapters so):
        where `read_into` reports a file cut short by another process as an error, a
        mapping read past the new end stops the process with SIGBUS."""
        info, storage = self._storage(name)
        with self._map_lock:
            if self._mapping is None and not self._unmappable:
                fd = self._descriptor()
                end = max((t.end for t in self.tensors.values()), default=0)
                if os.fstat(fd).st_size < end:
                    raise self._fail("file ended early (truncated?)")
                try:
                    self._mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # a file system that cannot map it: read instead
                    self._unmappable = True
            mapping = self._mapping
        if mapping is None:
            return self.stored(name)
        return np.frombuffer(mapping, dtype=storage, count=info.numel, offset=info.start).reshape(info.shape)

    def _storage(self, name: str) -> tuple[TensorInfo, np.dtype[Any]]:
        """A tensor's entry and the numpy type of its stored elements (BF16: uint16 bit
        patterns); a dtype numpy cannot hold as numbers is refused."""
        info = self.info(name)
        if info.dtype == "BF16":
            return info, np.dtype("<u2")
        if info.dtype not in NUMPY_DTYPE:
            raise self._fail(f"tensor {name!r}: dtype {info.dtype} cannot be read as numbers here")
        return info, np.dtype(NUMPY_DTYPE[info.dtype])

    def _bf16_as_float32(self, name: str, numel: int) -> np.ndarray:
        """A BF16 tensor widened to float32 inside the one array it ends in: its bytes are
        read into that array's upper half and widened in place (`_widen_bf16`). No second
        buffer is touched: fresh pages cost more here than the shift itself."""
        bits = np.empty(numel, dtype="<u4")
        halves = bits.view("<u2")
        self.read_into(name, halves[numel:])
        _widen_bf16(halves[numel:], bits)
        return bits.view("<f4")

    def torch(self, name: str, buffer: Any = None) -> Any:
        """The tensor as a CPU torch tensor in its stored dtype (imports torch lazily).

        With `buffer` (a torch uint8 tensor of at least the tensor's byte count, pinned
        memory included) the bytes are read into it and the result is a view of it.
        """
        import torch

        from lora_tools.io.dtypes import torch_dtype

        info = self.info(name)
        dtype = torch_dtype(info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        if buffer is None:
            return torch.frombuffer(self.read_bytes(name), dtype=dtype).reshape(info.shape)
        raw = buffer[: info.nbytes]
        self.read_into(name, raw.numpy())
        return raw.view(dtype).reshape(info.shape)


def _widen_bf16(halves: np.ndarray, bits: np.ndarray) -> None:
    """bits[i] = halves[i] << 16 (bf16 → float32 bits, exact), front to back in chunks.
    `halves` may be the upper half of `bits` itself: chunk [lo, hi) writes halves
    [2·lo, 2·hi), which never reach the unread [n + hi, …); the first chunks overlap their
    own input, and numpy buffers such a chunk itself."""
    for lo in range(0, bits.size, _WIDEN_CHUNK):
        hi = min(lo + _WIDEN_CHUNK, bits.size)
        np.left_shift(halves[lo:hi], 16, out=bits[lo:hi], dtype="<u4")
