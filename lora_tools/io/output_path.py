"""Which output paths lora-tools may write, and which existing ones `--force` may replace.

Imports nothing heavy: the CLI uses it (signals, published outputs) before any command runs.

Paths are compared by identity, (st_dev, st_ino), never as strings: a folder reached
through a symlink, a bind mount or another spelling on a case-insensitive file system
("./Base" for "./base") is the same folder. Also the hidden temporary names written
beside an output (kept under the file-name limit however long OUT's name is).
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from lora_tools.errors import RequestError

Identity = tuple[int, int]

# What lora-tools writes: a model folder (merge) or an adapter folder (blend). --force
# replaces an existing folder only if it holds one of these (or nothing at all).
_MODEL_NAMES = ("config.json", "adapter_config.json")
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")
_ADAPTER_PREFIX = "adapter_model."
_NAME_MAX = 255
# The signals that stop a run and that a handler can act on (SIGKILL cannot be caught).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)
_published: list[str] = []


def record_published(out: str) -> None:
    _published.append(out)


def published_outputs() -> list[str]:
    """Every OUT this process has published so far (for the CLI's message on a late signal)."""
    return list(_published)


def forget_published() -> None:
    _published.clear()


def identity(path: Path | str) -> Identity | None:
    """(st_dev, st_ino) of what `path` names (links followed), None if it cannot be reached."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _chain(path: Path) -> set[Identity]:
    """Identities of `path` and of every folder above it, reached both as written and as resolved."""
    absolute = Path(os.path.join(os.getcwd(), path))  # ".." kept: stat resolves it as the kernel does
    candidates = [absolute, *absolute.parents]
    try:
        real = absolute.resolve()
        candidates += [real, *real.parents]
    except (OSError, RuntimeError):
        pass
    return {ident for ident in map(identity, candidates) if ident is not None}


def _same_entry(out: Path, source: Path) -> bool:
    """Whether OUT's directory entry is the input file's own (not a hard link to it)."""
    if out.is_symlink():
        return True  # replacing the link would not touch the input, but the user meant the input
    real = source.resolve()
    if identity(out.parent) != identity(real.parent):
        return False
    if out.name == real.name:
        return True
    try:  # a case-insensitive file system finds "Base" under the stored name "base"
        return out.name not in os.listdir(out.parent)
    except OSError:
        return True


def _existing(inputs: Sequence[Path | str]) -> Iterator[tuple[Path | str, Path, tuple[int, int], bool]]:
    """(as given, as a Path, its identity, whether a folder) for each input that exists."""
    for given in inputs:
        source = Path(given)
        source_id = identity(source)
        if source_id is not None:
            yield given, source, source_id, stat.S_ISDIR(os.stat(source).st_mode)


def _check_overlap(out: Path, inputs: Sequence[Path | str], hint: str) -> None:
    out_id = identity(out)
    above = _chain(out.parent)  # the folder OUT goes into and every folder above it
    inside_out = out_id is not None and stat.S_ISDIR(os.stat(out).st_mode)
    for given, source, source_id, is_dir in _existing(inputs):
        overlaps = (
            (is_dir and source_id in above)  # OUT would be written inside the input
            or (out_id == source_id and (is_dir or _same_entry(out, source)))  # OUT is the input
            or (inside_out and out_id in _chain(source))  # --force would delete the input with OUT
        )
        if overlaps:
            raise RequestError(out, f"output overlaps the input {given} ({hint})")


def _check_not_working_folder(out: Path) -> None:
    out_id = identity(out)
    if out_id is None:
        return
    if out_id == identity(os.getcwd()):
        raise RequestError(out, "is the current folder; refusing to write over it (choose a new output path)")
    if out_id in _chain(Path(os.getcwd())):
        raise RequestError(out, "holds the current folder; refusing to write over it (choose a new output path)")


def _check_parent(out: Path) -> None:
    parent = out.parent
    if parent.is_dir():
        return
    if parent.exists() or parent.is_symlink():
        raise RequestError(out, f"{parent} is not a folder")
    raise RequestError(out, f"the folder {parent} does not exist")


def looks_written_by_us(folder: Path) -> bool:
    """A model folder (config.json, *.safetensors, an index) or an adapter folder."""
    for name in os.listdir(folder):
        if name in _MODEL_NAMES or name.endswith(_MODEL_SUFFIXES) or name.startswith(_ADAPTER_PREFIX):
            return True
    return False


def _check_replaceable(out: Path) -> None:
    """--force replaces only what lora-tools could have written."""
    if out.is_symlink():
        return  # the link is replaced, never what it points to
    mode = os.stat(out).st_mode
    if stat.S_ISDIR(mode):
        names = sorted(os.listdir(out))
        if not names or looks_written_by_us(out):
            return
        what = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} other entries"
        raise RequestError(out, f"holds {what}, which lora-tools did not write; refusing to replace it")
    if stat.S_ISREG(mode):
        if out.name.lower().endswith(".safetensors"):
            return
        raise RequestError(out, "is a file lora-tools did not write (not .safetensors); refusing to replace it")
    raise RequestError(out, "is not a file or folder; refusing to replace it")


def check_output_path(out: str | os.PathLike[str], force: bool, inputs: Sequence[Path | str] = ()) -> None:
    """Refuse an output that exists (without force), that overlaps an input, or that --force must not replace.

    Overlap either way is refused: OUT inside an input would write into the model being
    read, and an input inside OUT would be deleted by --force. The current folder and
    the folders above it are never replaced; nor is a folder or file lora-tools did not write.
    """
    if os.fspath(out) == "":
        raise RequestError(None, "the output path is empty")
    out = Path(out)
    _check_overlap(out, inputs, "choose another output path")
    _check_not_working_folder(out)
    _check_parent(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise RequestError(out, "already exists (use --force to replace it)")
        _check_replaceable(out)


def check_plot_path(path: str | os.PathLike[str], force: bool, inputs: Sequence[Path | str]) -> None:
    """`inspect --plot FILE`: never an input or a file inside one; an existing FILE only with --force
    (an earlier lora-tools plot is replaced without it)."""
    if os.fspath(path) == "":
        raise RequestError(None, "the --plot path is empty")
    target = Path(path)
    target_id = identity(target)
    for given, source, source_id, is_dir in _existing(inputs):
        inside = is_dir and source_id in _chain(target.parent)
        same = target_id == source_id and (is_dir or _same_entry(target, source))
        if same or (inside and target_id is not None and not is_our_plot(target)):
            raise RequestError(path, f"would overwrite the input {given} (choose another --plot path)")
    if target_id is None:
        return
    if target.is_dir():
        raise RequestError(path, "is a folder (give a file name for the PNG)")
    if not force and not is_our_plot(target):
        raise RequestError(path, "already exists (use --force to replace it)")


PLOT_SOFTWARE = "lora-tools inspect --plot"


def is_our_plot(path: Path) -> bool:
    """A PNG that an earlier `inspect --plot` wrote (its Software text chunk says so)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PLOT_SOFTWARE.encode() in head


def temporary_sibling(out: Path, marker: str) -> Path:
    """`.<name><marker><random>` beside `out`, shortened to fit the file-name limit.

    When OUT's own name is near the limit, the copy of it in the hidden name is cut (on a
    UTF-8 character boundary); the random part keeps the name unique.
    """
    suffix = f"{marker}{os.urandom(6).hex()}"  # what secrets.token_hex(6) gives, without its imports
    try:
        limit = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = _NAME_MAX
    room = min(limit, _NAME_MAX) - 1 - len(suffix.encode())
    stem = os.fsencode(out.name)
    if len(stem) > room:
        stem = stem[:room].decode("utf-8", "ignore").encode() if _is_utf8(stem) else stem[:room]
    return out.parent / os.fsdecode(b"." + stem + suffix.encode())


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
