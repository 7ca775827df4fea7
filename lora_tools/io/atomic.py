"""Atomic output: an interrupted write never leaves something at OUT that looks complete.

Everything is written under a hidden temporary sibling and moved into place with
`os.replace` only after the caller's block finished without an exception; the temporary
is removed whenever the process can still act (an exception, Ctrl-C, SIGTERM). With
--force an existing OUT is replaced only then.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from lora_tools.errors import FormatError, LoraToolsError, RequestError, Terminated
from lora_tools.io.stream_writer import StreamWriterError

TMP_MARKER = ".lora-tools-tmp-"
OLD_MARKER = ".lora-tools-old-"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that exists (without force) or that overlaps an input.

    Overlap either way is refused: OUT inside an input would write into the model being
    read, and an input inside OUT would be deleted by --force.
    """
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _inside(target, source) or _inside(source, target):
            raise RequestError(out, f"output overlaps the input {given} (choose another output path)")
    if not out.parent.is_dir():
        raise RequestError(out, f"the folder {out.parent} does not exist")
    if (out.exists() or out.is_symlink()) and not force:
        raise RequestError(out, "already exists (use --force to replace it)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(out: Path, marker: str) -> Path:
    return out.parent / f".{out.name}{marker}{secrets.token_hex(6)}"


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


@contextlib.contextmanager
def _sigterm_raises(state: dict[str, bool]) -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (deferred while state["defer"] is set)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python lets only the main thread set handlers; there SIGTERM stays fatal
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if state["defer"]:
            state["pending"] = True
        else:
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], force: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out` to fill (file or folder); publish it at the end.

    On normal exit the temporary is moved to `out` with os.replace (an old folder under
    --force is renamed aside first and deleted after, so `out` is never half-written).
    On any exception, KeyboardInterrupt and SIGTERM included, the temporary is removed
    and the exception re-raised; an old `out` is left untouched. SIGKILL or a power cut
    cannot be handled: then the temporary stays behind under its hidden name
    `.<name>.lora-tools-tmp-<random>`, never under `out`'s name.
    The checks (exists without force, overlap with an input) run before anything is
    written. Wrap in `wrap_write_errors(out)` to turn OSError into a LoraToolsError.
    """
    out = Path(out)
    check_output_path(out, force, inputs)
    target = Path(os.path.abspath(out))  # "." or "x/.." have no usable name; links stay links
    if target == target.parent:
        raise RequestError(out, "is not a usable output path")
    tmp = _sibling(target, TMP_MARKER)
    state = {"defer": False, "pending": False}
    with _sigterm_raises(state):
        try:
            yield tmp
            state["defer"] = True  # a rename half done must finish (or be undone) first
            _commit(tmp, target, force)
        except BaseException:
            state["defer"] = True
            _remove(tmp)
            raise
        finally:
            state["defer"] = False
        if state["pending"]:
            raise Terminated()


@contextlib.contextmanager
def wrap_write_errors(out: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError (ENOSPC, EACCES, ...) into one LoraToolsError line naming `out`."""
    try:
        yield
    except OSError as exc:
        raise LoraToolsError(out, f"cannot write: {exc.strerror or exc}") from exc


def copy_extra_files(src_dir: Path, names: Iterable[str | os.PathLike[str]], dst_dir: Path) -> None:
    """Copy non-weight files (config, tokenizer, README...) byte for byte, keeping relative paths.

    A name that is a folder is copied whole; symlinks are copied as the files they point
    to (a Hugging Face cache snapshot is all symlinks into its blob store).
    """
    for name in names:
        source, target = Path(src_dir) / name, Path(dst_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            continue
        try:
            shutil.copy2(source, target)
        except OSError as exc:  # reading the source failed: name it, not the output
            if exc.filename is not None and os.fspath(exc.filename) == os.fspath(source):
                raise FormatError(source, f"cannot read: {exc.strerror or exc}") from None
            raise
