"""Running a typer app the pkd way: honest exit codes, one paragraph per error, no traceback.

Exit codes: 0 done; 1 a fault (``pkd-prep verify`` found one, an OS error, an unexpected error);
2 a usage error (typer's usual usage paragraph) or a pkd error (its own ``exit_code``); 130 Ctrl-C and
143 SIGTERM, both after ``interrupted: rerun the same command to resume``. ``PKD_DEBUG=1`` re-raises
instead, so the traceback shows.

typer 0.29 vendors its own click: with ``standalone_mode=False`` it *returns* the code of a
``typer.Exit`` (and 130 for a KeyboardInterrupt) instead of raising it, so the return value is the exit
code; its exceptions are ``typer._click`` classes, not ``click`` ones.
"""

from __future__ import annotations

import os
import signal
import sys

import typer
from typer._click.exceptions import ClickException

from pkd.common import logs
from pkd.common.errors import PkdError
from pkd.common.signals import STOP_SIGNALS, Interrupts

INTERRUPTED = 130  # what typer returns for a KeyboardInterrupt (128 + SIGINT)


def _one_paragraph(exc: BaseException) -> str:
    """``error: …`` for an OS error (naming its path) or an unexpected exception, without a traceback."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return (
            f"error: {exc.strerror or exc}{where}. Check the path, its permissions and free space, then "
            "rerun the same command."
        )
    return f"error: unexpected {type(exc).__name__}: {exc}. Rerun with PKD_DEBUG=1 for the traceback and report it."


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run ``app`` and exit with the code the module docstring lists."""
    logs.configure()
    debug = os.environ.get("PKD_DEBUG") == "1"
    previous = {sig: signal.signal(sig, Interrupts.on_stop) for sig in STOP_SIGNALS}
    try:
        _run_and_exit(app, argv, debug)
    finally:
        Interrupts.received = None  # the stop was this command's: a later call in the same process starts clean
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_and_exit(app: typer.Typer, argv: list[str] | None, debug: bool) -> None:
    """Run ``app`` and turn its outcome into an exit code and at most one paragraph on stderr."""
    try:
        code = app(args=argv, standalone_mode=False)
    except PkdError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        typer.echo(_one_paragraph(exc), err=True)
        sys.exit(1)
    if code == INTERRUPTED:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(128 + (Interrupts.received or signal.SIGINT))
    sys.exit(code if isinstance(code, int) else 0)
