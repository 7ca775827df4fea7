"""The `lora-tools` command line: parse, call the library, render, map errors.

Library modules are imported inside each command so that `lora-tools --help` never
pays for numpy, torch or matplotlib.

This package: the group `cli` (defined in `group`, re-exported here) and `main`, the
console script's entry point (`lora_tools.cli:main`); the helpers several verbs share in
`common`; one module per verb holding its command, registered on the group when imported
here.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from lora_tools.cli.group import InputError, cli
from lora_tools.errors import printable

# Importing a verb's module registers its command; this order is the order of `cli.commands`.
# isort: off
from lora_tools.cli.inspect import inspect_command
from lora_tools.cli.merge import merge_command
from lora_tools.cli.verify import verify_command
from lora_tools.cli.blend import blend_command
from lora_tools.cli.resize import resize_command
from lora_tools.cli.convert import convert_command
from lora_tools.cli.extract import extract_command
# isort: on

__all__ = [
    "INTERNAL_ERROR", "InputError", "blend_command", "cli", "convert_command", "extract_command", "inspect_command",
    "main", "merge_command", "resize_command", "run", "verify_command",
]

# A bug in lora-tools: neither 1 (a verify check failed) nor 2 (the user's input).
INTERNAL_ERROR = 3


def _stopped(signum: int, written: str | None) -> int:
    """Say which signal stopped the run, and whether OUT was already complete; return the status."""
    import signal

    from lora_tools.io.output_path import published_outputs

    written = written or next(reversed(published_outputs()), None)
    named: dict[int, str] = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
    what = named.get(signum) or f"terminated by {signal.Signals(signum).name}"
    click.echo(f"Error: {what}" + (f" after the output was written: {written}" if written else ""), err=True)
    return 128 + signum


def _run_command() -> int:
    """Run the command; whatever ends it is reported in one stderr line. Returns the exit status."""
    import os
    import signal

    from lora_tools.errors import Terminated

    try:  # cli.main() would print a blank line on Ctrl-C: invoke the group directly
        with cli.make_context("lora-tools", sys.argv[1:]) as context:
            cli.invoke(context)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _stopped(signal.SIGINT, None)
    except Terminated as stop:
        return _stopped(stop.signum, stop.written)
    except SystemExit as done:  # verify's status 1
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BrokenPipeError:  # `lora-tools inspect ... | head`
        return 0
    except Exception as error:  # noqa: BLE001 - a bug: still one line, and a way to see more
        if os.environ.get("LORA_TOOLS_DEBUG"):
            raise
        message = printable(str(error).splitlines()[0]) if str(error) else ""
        click.echo(f"Error: internal error: {type(error).__name__}: {message} (set LORA_TOOLS_DEBUG=1 for details)", err=True)
        return INTERNAL_ERROR
    return 0


def _ignore_stop_signals() -> None:
    """At interpreter exit: the outcome is reported, a late signal must not change it (or kill silently)."""
    import signal

    from lora_tools.io.output_path import STOP_SIGNALS

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def main() -> None:
    """Entry point of the console script.

    Click's standalone mode would turn Ctrl-C into "Aborted!" with status 1, which is
    verify's "not equivalent"; here a stop signal exits with 128 + its number and one line:
    Ctrl-C 130 "interrupted", SIGTERM 143 "terminated", SIGHUP 129 and SIGQUIT 131 "terminated
    by SIG…", each saying so when an output was already written. A signal that arrives
    once the outcome is reported is ignored. Anything unexpected is one line too
    (LORA_TOOLS_DEBUG=1 shows the traceback).
    """
    import atexit
    import gc
    import signal
    import threading

    from lora_tools.errors import Terminated
    from lora_tools.io.output_path import STOP_SIGNALS, forget_published

    forget_published()
    from lora_tools.cli import common

    frozen_before = gc.get_freeze_count()
    common.FREEZE_IMPORTS = True  # the verbs freeze what their imports made (`common.imports_without_gc`)

    def stop(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:  # SIGINT keeps Python's KeyboardInterrupt; an ignored one stays ignored
            before = signal.getsignal(signum)
            if signum != signal.SIGINT and before is not signal.SIG_IGN and before is not None:
                previous[signum] = signal.signal(signum, stop)
    try:
        try:
            code = _run_command()
        except KeyboardInterrupt:  # while reporting another outcome
            code = _stopped(signal.SIGINT, None)
        except Terminated as late:
            code = _stopped(late.signum, late.written)
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        common.FREEZE_IMPORTS = False
        if not frozen_before:  # a caller running `main` in its own process gets a collector as it had it
            gc.unfreeze()
    atexit.unregister(_ignore_stop_signals)
    atexit.register(_ignore_stop_signals)  # registered last, so it runs before torch's own exit work
    sys.exit(code)


def run() -> NoReturn:
    """The console script and `python -m lora_tools`: `main`, then the process ends at
    once, its streams flushed, without Python's teardown.

    Why: by then the outcome is reported and every output is on disk (written, fsynced,
    renamed; every thread joined), and tearing down the interpreter (hundreds of modules,
    the run's arrays) only delays the exit status: 15-20 ms of a 0.5 s resize. `main`
    itself returns normally, for callers that run commands in their own process."""
    import os

    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): what was to be read has been
            pass
    os._exit(code)
