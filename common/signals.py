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
    """The SIGTERM handler a CLI installs, and which stop signal came last (its exit code is 128 + it)."""

    received = signal.SIGINT

    @classmethod
    def on_term(cls, signum: int, frame: FrameType | None) -> None:
        cls.received = signal.Signals(signum)
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
