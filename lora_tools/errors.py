"""The library's own exceptions.

Every error a user can cause is a `LoraToolsError` whose message starts with the path
of the file at fault, so the CLI can print it as one line and exit with status 2.
"""

from __future__ import annotations

import os
import signal


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


class Terminated(SystemExit):
    """SIGTERM arrived while writing output: unwinds like an exception, exits with 143.

    A SystemExit so that `except Exception` blocks do not swallow it and Python exits
    without a traceback, with the status a shell reports for a SIGTERM-killed process.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)
