"""One writer per output: a kernel lock file beside a store or run folder, held while a command writes it.

``flock`` locks belong to the open file: the kernel drops them when the holder exits, even by kill -9,
so a stale lock file never blocks a rerun. The file holds the holder's pid for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pkd.common.errors import ConfigError, PkdError


def lock_path(target: str | Path) -> Path:
    """``<target>.lock``: beside the target, so deleting or replacing the target keeps the lock."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


@contextmanager
def exclusive(target: str | Path, holder: str, error: type[PkdError] = ConfigError) -> Iterator[None]:
    """Hold the lock of ``target`` (a local path) or raise ``error`` naming the pid of ``holder`` holding it."""
    path = lock_path(target)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # removed again if left empty
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (held, locked, for the whole with-block of the caller)
    except OSError as exc:
        raise error(
            f"cannot create the lock file {path} ({exc.strerror}); {Path(target).parent} must be a "
            "writable folder: fix its permissions or choose another output path."
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise error(
                f"another {holder} (pid {handle.read().strip() or '?'}) is writing {target}; wait for it "
                "to finish or stop it, then rerun this command."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:  # not empty: the command wrote its output there
                    break
