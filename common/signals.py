"""Ctrl-C and SIGTERM: both stop a command the same way (KeyboardInterrupt, so every ``finally`` runs), except
inside a ``deferred()`` block, which finishes first.

torch.save turns an interrupt raised inside its write callback into a RuntimeError and a torn temp file;
deferring the signal until the checkpoint is written keeps Ctrl-C an interrupt (exit 130) and the
checkpoint whole.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The stop-signal handler a CLI installs, and which stop signal came last (None: none; its exit code is
    128 + it, 130 for a KeyboardInterrupt without one).

    Python prints and drops an exception raised inside a finaliser (``__del__``, a weakref or GC callback), so a
    KeyboardInterrupt that the handler raises while one runs is lost; long loops call ``check`` once per step
    to raise it again, so Ctrl-C always stops the command."""

    received: signal.Signals | None = None

    @classmethod
    def on_stop(cls, signum: int, frame: FrameType | None) -> None:
        cls.received = signal.Signals(signum)
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        """Raise KeyboardInterrupt if a stop signal came (and its first raise was dropped)."""
        if cls.received is not None:
            raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one that came (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[signal.Signals] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum))) for sig in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])
