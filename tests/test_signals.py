"""Ctrl-C and SIGTERM stop a command with 130 / 143 wherever they land: inside a deferred block (delivered at its
end) and inside a finaliser, where Python drops the KeyboardInterrupt the handler raises."""

from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from pkd.common import signals
from pkd.common.cli import run_app


class SignalsWhenCollected:
    """Sends ``sig`` to this process from ``__del__``: its handler runs inside the finaliser."""

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)
        time.sleep(0.05)


def exit_code(command) -> int:
    app = typer.Typer()
    app.command()(command)
    with pytest.raises(SystemExit) as stop:
        run_app(app, [])
    return stop.value.code


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, as expected
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_inside_a_finaliser_still_stops_the_loop(sig, code):
    steps = []

    def loop() -> None:
        for step in range(100):
            signals.Interrupts.check()
            steps.append(step)
            if step == 3:
                SignalsWhenCollected(sig)  # collected at once: the KeyboardInterrupt is raised and dropped there

    assert exit_code(loop) == code
    assert steps == [0, 1, 2, 3]

    def next_command() -> None:
        signals.Interrupts.check()

    assert exit_code(next_command) == 0  # the stop was that command's alone


def test_a_signal_inside_a_deferred_block_waits_for_its_end():
    done = []

    def write() -> None:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("written")
        done.append("after")

    assert exit_code(write) == 130
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_app restores what it replaced
