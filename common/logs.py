"""Logging and progress bars of the pkd command-line tools, set up once per process.

Quiet by default: the console shows pkd's own messages (INFO and up) and other libraries' warnings;
known-harmless library messages are demoted to DEBUG (``demoted``). ``--log-file PATH`` also writes
every record, pkd's DEBUG included, with timestamps to PATH. Progress bars (``progress_bar``) redraw in
place on a terminal; when stderr is a pipe or file they become one log line per ``LINE_SECONDS`` (and one
at the end), so captured output stays readable. ``--no-progress`` turns every bar off.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from pkd.common.errors import ConfigError

LINE_SECONDS = 30.0
PROGRESS_LOGGER = "pkd.progress"
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class _Settings:
    progress: bool = True


_settings = _Settings()


class _ConsoleFormatter(logging.Formatter):
    """pkd's INFO lines as plain text; anything else prefixed with its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("pkd"):
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def _console_filter(record: logging.LogRecord) -> bool:
    """pkd's records from INFO up, other libraries' from WARNING up."""
    return record.levelno >= (logging.INFO if record.name.startswith("pkd") else logging.WARNING)


def configure(progress: bool = True, log_file: Path | None = None) -> None:
    """Set up console (and optional file) logging and the progress policy; calling it again replaces both."""
    console = logging.StreamHandler()
    console.setFormatter(_ConsoleFormatter())
    console.addFilter(_console_filter)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot write the log file {log_file} ({exc.strerror}); pass a writable --log-file path."
            ) from exc
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.getLogger("pkd").setLevel(logging.DEBUG if log_file is not None else logging.INFO)
    _settings.progress = progress


def cli_options(
    no_progress: Annotated[
        bool,
        typer.Option(
            "--no-progress", help=f"Turn progress bars off (on a pipe they print one line every {LINE_SECONDS:.0f} s)."
        ),
    ] = False,
    log_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write every log record (with DEBUG detail and timestamps) to this file; it is appended to."
        ),
    ] = None,
) -> None:
    """Options every pkd command line takes before its command (a typer app callback)."""
    configure(progress=not no_progress, log_file=log_file)


class _LogLines(io.TextIOBase):
    """A tqdm output that logs each redraw as one line (no carriage returns or cursor moves)."""

    def write(self, text: str) -> int:
        line = _ESCAPES.sub("", text).replace("\r", "").strip()
        if line:
            logging.getLogger(PROGRESS_LOGGER).info(line)
        return len(text)


class _LineBar(tqdm):  # type: ignore[misc]  # tqdm ships no type hints
    """A tqdm that logs lines instead of redrawing: one at the start, at most one per ``mininterval``
    (also when the caller forces a refresh, e.g. ``set_postfix``), and the final state at close."""

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        if self.disable:
            return False
        now: float = self._time()
        if now - getattr(self, "last_print_t", -math.inf) < self.mininterval:
            return False
        self.last_print_t = now
        return bool(super().refresh(nolock=nolock, lock_args=lock_args))


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar named by its stage (``desc``), off under ``--no-progress``, line-based off a terminal."""
    disable = disable or not _settings.progress
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, **kwargs)
    kwargs.update(dynamic_ncols=False, ascii=True, mininterval=LINE_SECONDS, file=_LogLines())
    return _LineBar(iterable, desc=desc, disable=disable, **kwargs)


class _Demote(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.prefix):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


@contextmanager
def demoted(logger: str, prefix: str) -> Iterator[None]:
    """Within the block, records of ``logger`` (``""``: the root logger) starting with ``prefix`` are DEBUG.

    For library messages that are expected where pkd triggers them (e.g. open_clip's "No pretrained
    weights loaded" when pkd loads the weights itself afterwards).
    """
    target = logging.getLogger(logger or None)
    demote = _Demote(prefix)
    target.addFilter(demote)
    try:
        yield
    finally:
        target.removeFilter(demote)
