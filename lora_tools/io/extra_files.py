"""Copying a base's non-weight files (config, tokenizer, README...) into a merged folder, safely.

Which files to copy is `BaseCheckpoint.extra_files`'s choice (it refuses links that leave
the model folder, and link loops). Here each one is copied byte for byte as the file it
is or links to, with its permission bits and times, and only if it is a regular file: a
FIFO would block the copy forever and a device such as /dev/zero would fill the disk.
The copy is our own read/write loop so that a failure names the right file: a read error
is the input's (FormatError naming it), a write error is OUT's (the OSError goes up
unchanged, for the caller's `atomic.wrap_write_errors(out)`). shutil.copy2's sendfile
cannot tell the two apart and blamed the input for a full disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from lora_tools.errors import FormatError
from lora_tools.io.safetensors_file import open_regular

__all__ = ["copy_extra_files"]

_CHUNK = 1 << 20


def copy_extra_files(src_dir: Path, names: Iterable[str | os.PathLike[str]], dst_dir: Path) -> None:
    """Copy `src_dir/name` to `dst_dir/name` for each name (a file path relative to both),
    creating the folders on the way. Symlinks are copied as the files they point to (a
    Hugging Face cache snapshot is all symlinks into its blob store); anything but a
    regular file is refused with FormatError before it is opened.
    """
    for name in names:
        source, target = Path(src_dir) / name, Path(dst_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(source, target)


def _copy_file(source: Path, target: Path) -> None:
    src = open_regular(source)  # FormatError naming source: missing, a folder, a FIFO, a device
    try:
        info = os.fstat(src)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        dst = os.open(target, flags, 0o600)
        try:
            while True:
                try:
                    chunk = os.read(src, _CHUNK)
                except OSError as exc:
                    raise FormatError(source, f"cannot read: {exc.strerror or exc}") from None
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.chmod(target, stat.S_IMODE(info.st_mode))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
