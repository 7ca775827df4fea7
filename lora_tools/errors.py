"""The library's own exceptions.

Every error a user can cause is a `LoraToolsError` whose message starts with the path
of the file at fault, so the CLI can print it as one line and exit with status 2.
"""

from __future__ import annotations

import os
import re
import signal

# C0 controls, DEL, C1 controls and lone surrogates: what a name read from a file may
# hold that would move the cursor, clear the screen, retitle the terminal, split one
# error into several lines, or fail to encode on a UTF-8 stream.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) and lone surrogate written as
    a Python-style escape (\\x1b, \\ud800): safe to print on a terminal, one line.
    Everything else (non-ASCII letters, backslashes) is kept as it is."""
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class LoraToolsError(Exception):
    """A problem with the user's input or request; the message names the file."""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class FormatError(LoraToolsError):
    """The file is unreadable, corrupt, or in no format we understand."""


class MismatchError(LoraToolsError):
    """The adapter does not fit the base checkpoint (missing module, wrong shape)."""


class RequestError(LoraToolsError):
    """The request itself is inconsistent (e.g. wrong number of weights)."""


class CheckFailed(LoraToolsError):
    """A check the user asked for failed (merge --min-survival): exit status 1, as a
    failed verify, and nothing written."""


class Terminated(SystemExit):
    """A stop signal (SIGTERM, SIGHUP, SIGQUIT; SIGINT once OUT is published) arrived while
    working: unwinds like an exception, exits with 128 + the signal's number.

    A SystemExit so that `except Exception` blocks do not swallow it and Python exits
    without a traceback, with the status a shell reports for a process the signal killed.
    `written` is the output already published when the signal was acted on, if any.
    """

    def __init__(self, signum: int = signal.SIGTERM, written: str | os.PathLike[str] | None = None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.written = None if written is None else os.fspath(written)
