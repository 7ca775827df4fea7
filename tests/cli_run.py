"""Running the command line in-process, for the tests."""

from __future__ import annotations

from click.testing import CliRunner

from lora_tools.cli import cli


def run_cli(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lora-tools ARGS`, in-process. An exception other
    than SystemExit is an internal error: it is raised, so the test shows its traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
