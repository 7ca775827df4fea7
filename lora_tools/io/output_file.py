"""One output file's bytes, appended in order and on the disk when it is closed.

Why not a plain file object: a merge writes gigabytes once and never reads them back,
and through the page cache every 4 KiB of output costs a fresh page (allocated, filled,
written back later, on a VM often backed by the host on first touch). On the 2-core
dev VM that made writing 2.5 GB cost 3.5-9 s of CPU, against 0.1 s with O_DIRECT, which
hands the bytes to the disk from our own memory. So where the file system allows it the
file is opened for direct I/O, and bytes are gathered into an aligned staging buffer
that is written whenever it is full; the unaligned tail goes through the page cache at
close. Where direct I/O is refused (tmpfs, some network file systems, odd alignment)
the file falls back, silently, to buffered writes with in-kernel copies
(copy_file_range) and early write-back (sync_file_range).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_tools.io.safetensors_file import pread_into

# Direct I/O needs buffer address, file offset and length aligned to the device's logical
# block size; 4 KiB covers every common disk.
ALIGNMENT = 4096
STAGE_BYTES = 8 * 1024 * 1024
# Buffered mode: start the write-back of dirty pages every this many bytes, so that the
# fsync at the end finds little left to do and the disk works while we compute.
WRITE_BEHIND_BYTES = 64 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024
# Errors of an in-kernel copy that are the output's to report; any other makes the copy
# go on through a buffer, which tells a bad source from a bad destination.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


class SourceReadError(Exception):
    """Reading the source of a copy failed (`cause`), or it ended early (cause None)."""

    def __init__(self, cause: OSError | None) -> None:
        super().__init__(cause)
        self.cause = cause


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which Python does not wrap; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False where the system refuses."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except (OSError, ImportError):
        return False
    return True


class OutputFile:
    """A new file (never an existing one: "xb") that bytes are appended to in order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: Any = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        self.position = 0  # bytes accepted so far (staged or written)
        self._submitted = 0  # buffered mode: bytes whose write-back was started
        self._stage: mmap.mmap | None = None
        self._staged = 0
        if _set_direct(self._file.fileno(), True):
            self._stage = mmap.mmap(-1, STAGE_BYTES)

    @property
    def closed(self) -> bool:
        return bool(self._file.closed)

    @property
    def direct(self) -> bool:
        return self._stage is not None

    # -- appending ------------------------------------------------------------------
    def write(self, view: memoryview) -> None:
        """Append all of `view` (bytes)."""
        while view.nbytes:
            if self._stage is None:
                self._write_through(view)
                return
            count = min(STAGE_BYTES - self._staged, view.nbytes)
            memoryview(self._stage)[self._staged : self._staged + count] = view[:count]
            self._staged += count
            self.position += count
            view = view[count:]
            if self._staged == STAGE_BYTES:
                self._flush_stage()

    def copy_from(self, source_fd: int, start: int, nbytes: int) -> None:
        """Append `nbytes` of another file from offset `start`, never holding more than a
        chunk in memory. SourceReadError when the source fails or ends early."""
        done = self._copy_through_stage(source_fd, start, nbytes)
        if done < nbytes:
            done += self._copy_in_kernel(source_fd, start + done, nbytes - done)
        if done < nbytes:
            self._copy_through_buffer(source_fd, start + done, nbytes - done)

    def _copy_through_stage(self, source_fd: int, start: int, nbytes: int) -> int:
        """Bytes read into the stage before they were all there or direct I/O was left."""
        done = 0
        while done < nbytes and self._stage is not None:
            count = min(STAGE_BYTES - self._staged, nbytes - done)
            got = _pread(source_fd, memoryview(self._stage)[self._staged : self._staged + count], start + done)
            self._staged += got
            self.position += got
            done += got
            if self._staged == STAGE_BYTES:
                self._flush_stage()
        return done

    def _copy_in_kernel(self, source_fd: int, start: int, nbytes: int) -> int:
        """Bytes copied by copy_file_range before it finished or declined."""
        if not hasattr(os, "copy_file_range"):
            return 0
        target_fd = self._file.fileno()
        done = 0
        while done < nbytes:
            try:
                got = os.copy_file_range(source_fd, target_fd, nbytes - done, start + done)
            except OSError as exc:
                if exc.errno in _OUTPUT_ERRNOS:
                    raise
                return done  # not supported here, or a read error: the buffered copy names it
            if got == 0:
                return done  # end of the source: the buffered copy reports it
            done += got
            self._wrote(got)
        return done

    def _copy_through_buffer(self, source_fd: int, start: int, nbytes: int) -> None:
        buffer = memoryview(bytearray(min(COPY_CHUNK_BYTES, nbytes)))
        done = 0
        while done < nbytes:
            got = _pread(source_fd, buffer[: min(nbytes - done, len(buffer))], start + done)
            self._write_through(buffer[:got])
            done += got

    # -- reaching the file ------------------------------------------------------------
    def _flush_stage(self) -> None:
        pending = memoryview(self._stage)[: self._staged]  # type: ignore[arg-type]
        self._staged = 0
        self._write_through(pending, counted=True)

    def _write_through(self, view: memoryview, counted: bool = False) -> None:
        """Write `view` to the file now (partial writes retried). A direct write the
        system refuses (EINVAL: alignment) turns direct I/O off and is retried."""
        while view.nbytes:
            try:
                done = self._file.write(view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or self._stage is None:
                    raise
                self._leave_direct_mode()
                continue
            done = done if done is not None else view.nbytes
            view = view[done:]
            if not counted:
                self._wrote(done)

    def _wrote(self, nbytes: int) -> None:
        """Count bytes written through the page cache; past WRITE_BEHIND_BYTES not yet
        submitted, start their write-back (asynchronously: WRITE only queues the pages)."""
        self.position += nbytes
        pending = self.position - self._submitted
        if _SYNC_FILE_RANGE is not None and self._stage is None and pending >= WRITE_BEHIND_BYTES:
            _SYNC_FILE_RANGE(self._file.fileno(), self._submitted, pending, _SYNC_FILE_RANGE_WRITE)
            self._submitted = self.position  # a failure here is fsync's to report

    def _leave_direct_mode(self) -> None:
        _set_direct(self._file.fileno(), False)
        self._stage = None
        self._submitted = self.position

    # -- end ------------------------------------------------------------------------
    def close(self) -> None:
        """Write what is staged, fsync (a rename that follows must not publish a hollow
        file), close."""
        if self._file.closed:
            return
        try:
            if self._stage is not None and self._staged:
                tail = bytes(memoryview(self._stage)[: self._staged])  # unaligned: through the page cache
                self._staged = 0
                self._leave_direct_mode()
                self._write_through(memoryview(tail), counted=True)
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._release()

    def abort(self) -> None:
        """Close without writing what is staged (the caller removes the file)."""
        self._release()

    def _release(self) -> None:
        self._file.close()
        if self._stage is not None:
            with contextlib.suppress(BufferError):  # a view in a traceback: the GC unmaps it later
                self._stage.close()
            self._stage = None


def _pread(fd: int, into: memoryview, offset: int) -> int:
    """One positional read of at least a byte; SourceReadError on failure or at the end."""
    try:
        got = pread_into(fd, into, offset)
    except OSError as exc:
        raise SourceReadError(exc) from None
    if not got:
        raise SourceReadError(None)
    return int(got)
