"""Durable writes: a small file replaced whole, and the commit points a crash test kills at.

Every write that makes progress permanent (a checkpoint, a run record, a metrics line, a store shard's done
flag, store attrs and stats, a cache entry) ends with ``committed(what)``. Normally that does nothing. The
crash-point tests (``tests/test_crash_points.py``) set, in the environment of the process they start:

* ``PKD_CRASH_LOG=FILE``: append ``what`` to FILE at every commit (how the test enumerates them);
* ``PKD_CRASH_AT=N``: SIGKILL this process right after its N-th commit (as a power cut would stop it);
  with ``PKD_CRASH_DELAY=S`` as well, S seconds after it instead (in the middle of the next step or write).

``write_atomic`` is the one helper for a small file: temp file beside it, fsync, ``os.replace``, so a crash
leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

CRASH_AT = "PKD_CRASH_AT"
CRASH_LOG = "PKD_CRASH_LOG"
CRASH_DELAY = "PKD_CRASH_DELAY"

_count = 0


def committed(what: str) -> None:
    """Mark one durable write done (``what`` names it); the crash test's hook, a no-op otherwise."""
    global _count
    log, at = os.environ.get(CRASH_LOG), os.environ.get(CRASH_AT)
    if log is None and at is None:
        return
    _count += 1
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{what}\t{time.time():.3f}\n")
    if at is not None and _count == int(at):
        delay = float(os.environ.get(CRASH_DELAY, "0"))
        if not delay:
            os.kill(os.getpid(), signal.SIGKILL)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


def write_atomic(path: Path, data: str | bytes, what: str | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename), then commit ``what`` (default: the
    file's name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    committed(what or path.name)
