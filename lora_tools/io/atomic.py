"""Atomic output: an interrupted write never leaves something at OUT that looks complete.

Everything is written under a hidden temporary sibling and moved into place with
`os.replace` only after the caller's block finished without an exception; the temporary
is removed whenever the process can still act (an exception, Ctrl-C, SIGTERM, SIGHUP,
SIGQUIT). With --force an existing OUT is replaced only then, with those signals held
back until the replacement is complete. Which paths may be written: `output_path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lora_tools.errors import LoraToolsError, RequestError, Terminated
from lora_tools.io.output_path import (
    STOP_SIGNALS,
    check_output_path,
    forget_published,
    published_outputs,
    record_published,
    temporary_sibling,
)
from lora_tools.io.stream_writer import StreamWriterError

__all__ = ["OLD_MARKER", "STOP_SIGNALS", "TMP_MARKER", "atomic_output", "check_output_path", "forget_published",
           "published_outputs", "wrap_write_errors"]

TMP_MARKER = ".lora-tools-tmp-"
OLD_MARKER = ".lora-tools-old-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(out: Path, marker: str) -> Path:
    return temporary_sibling(out, marker)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temporary to `out`; a folder replaces an old one via a side name."""
    if not (tmp.exists() or tmp.is_symlink()):
        raise StreamWriterError(f"{tmp}: nothing was written to the temporary output")
    exists = out.exists() or out.is_symlink()
    if exists and not force:  # appeared while we worked
        raise RequestError(out, "already exists (use --force to replace it)")
    if not exists or (not tmp.is_dir() and not out.is_dir()):
        os.replace(tmp, out)  # atomic, also over an old file
    else:
        old = _sibling(out, OLD_MARKER)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the old one back before reporting
            raise
        _remove(old)
    with contextlib.suppress(OSError):  # make the rename itself durable, where supported
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Held:
    """Signal state shared with the handlers: whether to hold signals back, and the first one held."""

    def __init__(self) -> None:
        self.hold = False
        self.pending: int | None = None


@contextlib.contextmanager
def _signals_raise(held: _Held) -> Iterator[None]:
    """While inside, SIGTERM, SIGHUP and SIGQUIT raise `Terminated` and SIGINT KeyboardInterrupt,
    except while `held.hold` is set: then the first signal is kept in `held.pending`.

    A signal the process ignores (nohup, a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python lets only the main thread set handlers; there the signals keep their action
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if held.hold:
            if held.pending is None:
                held.pending = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    for signum in STOP_SIGNALS:
        before = signal.getsignal(signum)
        if before is signal.SIG_IGN or before is None:
            continue
        previous[signum] = before
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], force: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out` to fill (file or folder); publish it at the end.

    On normal exit the temporary is moved to `out` with os.replace (an old folder under
    --force is renamed aside first and deleted after, so `out` is never half-written).
    On any exception, KeyboardInterrupt and SIGTERM/SIGHUP/SIGQUIT included, the temporary
    is removed and the exception re-raised; an old `out` is left untouched. A signal that
    arrives while `out` is being replaced is held back until the replacement is complete
    (or undone), then raised as `Terminated(signum, written=out)` when `out` was published.
    SIGKILL or a power cut cannot be handled: then the temporary stays behind under its
    hidden name `.<name>.lora-tools-tmp-<random>`, never under `out`'s name.
    The checks (`output_path.check_output_path`) run before anything is written. Wrap in
    `wrap_write_errors(out)` to turn OSError into a LoraToolsError.
    """
    check_output_path(out, force, inputs)
    shown = os.fspath(out)
    target = Path(os.path.abspath(out))  # "." or "x/.." have no usable name; links stay links
    if target == target.parent:
        raise RequestError(out, "is not a usable output path")
    tmp = _sibling(target, TMP_MARKER)
    held = _Held()
    with _signals_raise(held):
        try:
            yield tmp
            held.hold = True  # a rename half done must finish (or be undone) first
            _commit(tmp, target, force)
            record_published(shown)
        except BaseException:
            held.hold = True
            _remove(tmp)
            raise
        finally:
            held.hold = False
        if held.pending is not None:
            raise Terminated(held.pending, written=shown)


@contextlib.contextmanager
def wrap_write_errors(out: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError (ENOSPC, EACCES, ...) into one LoraToolsError line naming `out`."""
    try:
        yield
    except OSError as exc:
        raise LoraToolsError(out, f"cannot write: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def written_atomically(
    out: str | os.PathLike[str], force: bool = False, inputs: Sequence[Path] = ()
) -> Iterator[Path]:
    """How every command writes OUT: `atomic_output` inside `wrap_write_errors`, and a
    writer's refusal (`encode.WriteError`: something the format cannot hold) as one line
    naming OUT. Yields the temporary path to write."""
    from lora_tools.io.encode import WriteError

    try:
        with wrap_write_errors(out), atomic_output(out, force, inputs) as tmp:
            yield tmp
    except WriteError as error:
        raise LoraToolsError(out, str(error)) from None
