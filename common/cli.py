"""Running a typer app the pkd way: user errors as one paragraph without a traceback, non-zero exit."""

from __future__ import annotations

import sys

import click
import typer

from pkd.common import logs
from pkd.common.errors import PkdError


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run ``app``; a PkdError prints ``error: <message>`` and exits with its code."""
    logs.configure()
    try:
        app(args=argv, standalone_mode=False)
    except PkdError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
