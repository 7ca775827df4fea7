"""A streaming safetensors writer: the header first, then the tensors one by one.

Why stream: a merge keeps every tensor's name, dtype and shape, so the whole header is
known before any tensor is computed. Writing it first and then the tensors one by one in
header order keeps peak memory near the largest tensor, whatever the model's size.
Where the files go and how an interrupted write is cleaned up is `atomic`'s job; how
the bytes reach the disk is `filesink`'s.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import SupportsWrite
from lora_tools.io.dtypes import DTYPE_ITEMSIZE, SAFETENSORS_ORDER
from lora_tools.io.output_file import OutputFile, SourceReadError
from lora_tools.io.safetensors_file import SafetensorsFile

# (name, safetensors dtype code, shape): all a header needs to know about a tensor.
Entry = tuple[str, str, Sequence[int]]

_DTYPE_RANK = {code: rank for rank, code in enumerate(SAFETENSORS_ORDER)}  # safetensors' own sort



class StreamWriterError(RuntimeError):
    """The writer was used against its protocol: a bug in lora-tools, not in the user's files."""


# -- the streaming writer -------------------------------------------------------------

def safetensors_order(entries: Iterable[Entry]) -> list[Entry]:
    """The entries in the order `safetensors.torch.save_file` lays them out.

    safetensors 0.8 sorts by dtype, largest first (its Dtype enum order, descending),
    then by name (byte order of UTF-8, which equals Python's str order). Only needed for
    tensors that come from nowhere; a merge passes its source's own order instead.
    """
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.get(e[1], -1), e[0]))


def file_layout(src: SafetensorsFile) -> list[Entry]:
    """A file's entries in the order its bytes are stored (by offset, empties by name).

    Writing a copy in this order reproduces the source's layout, and so its header byte
    for byte when safetensors wrote it (same order, same JSON, same padding).
    """
    infos = sorted(src.tensors.values(), key=lambda i: (i.start, i.end))
    return [(i.name, i.dtype, i.shape) for i in infos]


def build_header(entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte little-endian length plus the JSON header, as safetensors writes it.

    Compact JSON, UTF-8 unescaped (serde_json's style), `__metadata__` first when given
    (even empty, as safetensors does), tensors in the given order with contiguous
    data_offsets, padded with spaces to a multiple of 8 bytes so data starts aligned.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise StreamWriterError("__metadata__ must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if name == "__metadata__" or name in header:
            raise StreamWriterError(f"tensor name {name!r} is reserved or repeated")
        if dtype not in DTYPE_ITEMSIZE:
            raise StreamWriterError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise StreamWriterError(f"tensor {name!r}: invalid shape {shape!r}")
        nbytes = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": the readers refuse such names, so a bug if seen here
        texts = [*header, *(text for item in (metadata or {}).items() for text in item)]
        bad = next((text for text in texts if not _encodable(text)), "a name")
        raise StreamWriterError(f"{bad!r} is not valid Unicode (a lone surrogate)") from None
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _CountingSink:
    """Passes writes through to the file, refusing to go past one tensor's byte count."""

    def __init__(self, writer: SafetensorsStreamWriter, name: str, expected: int) -> None:
        self._writer, self._name, self.expected, self.written = writer, name, expected, 0

    def write(self, data: Any, /) -> int:
        view = memoryview(data).cast("B")
        if self.written + view.nbytes > self.expected:
            raise StreamWriterError(
                f"tensor {self._name!r}: more than its {self.expected} bytes written"
            )
        self._writer._raw_write(view)
        self.written += view.nbytes
        return view.nbytes


class SafetensorsStreamWriter:
    """Writes a safetensors file whose header is fixed up front, tensor by tensor.

    The header (see `build_header`) is written at construction; tensors must then be
    written in entry order, each with exactly its byte count, and `close()` checks that
    all of them were. The output is opened with "xb": it never clobbers an existing file
    (it is meant for the temporary of `atomic_output`). Data is assumed little-endian,
    like the host (x86, ARM), which is what safetensors stores.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        assert sys.byteorder == "little", "raw tensor bytes are written as the host stores them"
        self.path = Path(path)
        self.header = build_header(entries, metadata)
        self.entries: list[tuple[str, str, tuple[int, ...]]] = [
            (name, dtype, tuple(shape)) for name, dtype, shape in entries
        ]
        self._next = 0
        self._failed: str | None = None  # set when a write broke off: the file is unusable
        self._file = OutputFile(self.path)
        try:
            self._raw_write(memoryview(self.header))
        except BaseException:
            self._file.abort()
            raise

    # -- protocol -----------------------------------------------------------------
    @property
    def next_name(self) -> str | None:
        """The tensor the writer expects next, or None when all were written."""
        return self.entries[self._next][0] if self._next < len(self.entries) else None

    def _begin(self, name: str) -> int:
        if self._file.closed or self._failed:
            raise StreamWriterError(f"tensor {name!r}: the writer is closed or failed ({self._failed})")
        if name != self.next_name:
            raise StreamWriterError(f"tensor {name!r} written out of order, expected {self.next_name!r}")
        _, dtype, shape = self.entries[self._next]
        return math.prod(shape) * DTYPE_ITEMSIZE[dtype]

    def _finish(self, name: str, written: int, expected: int) -> None:
        if written != expected:
            self._failed = f"tensor {name!r} incomplete"
            raise StreamWriterError(f"tensor {name!r}: {written} bytes written, expected {expected}")
        self._next += 1

    def _raw_write(self, view: memoryview) -> None:
        self._file.write(view)

    # -- ways to write one tensor ---------------------------------------------------
    def write_bytes(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write tensor `name` from its complete raw bytes."""
        expected = self._begin(name)
        view = memoryview(data).cast("B")
        if view.nbytes != expected:
            raise StreamWriterError(f"tensor {name!r}: got {view.nbytes} bytes, expected {expected}")
        self._raw_write(view)
        self._finish(name, view.nbytes, expected)

    def write_chunks(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write tensor `name` from pieces of its raw bytes, in order."""

        def copy(sink: SupportsWrite) -> None:
            for chunk in chunks:
                sink.write(chunk)

        self.write_from(name, copy)

    def write_from(self, name: str, copy_fn: Callable[[SupportsWrite], object]) -> None:
        """Let `copy_fn(sink)` write tensor `name`'s bytes; the byte count is checked."""
        expected = self._begin(name)
        sink = _CountingSink(self, name, expected)
        try:
            copy_fn(sink)
        except BaseException:
            self._failed = f"writing tensor {name!r} raised"
            raise
        self._finish(name, sink.written, expected)

    def copy_tensor(self, name: str, src: SafetensorsFile, src_name: str | None = None) -> None:
        """Copy an untouched tensor's stored bytes from `src`: no decode, bounded memory.

        In the kernel (copy_file_range) where it can, so the bytes never enter this
        process; through a small buffer otherwise. A source that ends early is the
        source's fault (FormatError naming it); a write error stays an OSError.
        """
        info = src.info(src_name or name)
        expected = self._begin(name)
        if info.nbytes != expected:
            raise StreamWriterError(f"tensor {name!r}: source has {info.nbytes} bytes, expected {expected}")
        try:
            self._file.copy_from(src.fileno(), info.start, expected)
        except SourceReadError as exc:
            self._failed = f"copying tensor {name!r} failed"
            if exc.cause is None:
                raise FormatError(src.path, f"tensor {info.name!r}: file ended early (truncated?)") from None
            raise FormatError(src.path, f"cannot read: {exc.cause.strerror or exc.cause}") from None
        except BaseException:
            self._failed = f"copying tensor {name!r} raised"
            raise
        self._finish(name, expected, expected)

    def write_torch(self, name: str, tensor: Any) -> None:
        """Write a CPU torch tensor whose dtype and shape match the entry (bf16 included).

        The bytes come from viewing the tensor as uint8, which numpy can hold whatever
        the dtype; a non-contiguous tensor is made contiguous first.
        """
        import torch

        from lora_tools.io.dtypes import safetensors_code

        self._begin(name)  # order first, so the message says what went wrong
        _, dtype, shape = self.entries[self._next]
        if tensor.device.type != "cpu":
            raise StreamWriterError(f"tensor {name!r}: on {tensor.device}, move it to the CPU first")
        try:
            code = safetensors_code(tensor.dtype)
        except KeyError:
            raise StreamWriterError(f"tensor {name!r}: dtype {tensor.dtype} not supported") from None
        if code != dtype or tuple(tensor.shape) != shape:
            raise StreamWriterError(
                f"tensor {name!r}: got {code} {tuple(tensor.shape)}, expected {dtype} {shape}"
            )
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        self.write_bytes(name, memoryview(flat.numpy()))

    # -- end --------------------------------------------------------------------------
    def close(self) -> None:
        """Flush to disk (fsync: the rename that follows must not publish a hollow file)
        and check that every tensor was written."""
        if self._file.closed:
            return
        self._file.close()
        if self.next_name is not None:
            raise StreamWriterError(
                f"{self.path}: closed with {len(self.entries) - self._next} tensors unwritten, "
                f"next {self.next_name!r}"
            )

    def abort(self) -> None:
        """Close without checks (the file is incomplete; the caller removes it)."""
        self._file.abort()

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On an exception, do not mask it with "tensors unwritten".
        self.abort() if exc_type is not None else self.close()
