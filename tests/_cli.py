"""Running pkd's installed console scripts in a subprocess, and writing their options, for the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The console scripts installed beside this interpreter (the worktree's virtualenv).
BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """Path of the installed console script ``name`` (``pkd-prep``, ``pkd-train``)."""
    return str(BIN / name)


def run_script(name: str, *args: object, timeout: float | None = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` with ``args`` (made strings); the result carries
    ``returncode``, ``stdout`` and ``stderr`` as text. ``kwargs`` go to ``subprocess.run`` (cwd, env, ...)."""
    return run_command(script(name), *args, timeout=timeout, **kwargs)


def run_command(*args: object, timeout: float | None = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``args`` (made strings) in a subprocess, capturing stdout and stderr as text."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def flags(**options: object) -> list[str]:
    """Command-line options in order: ``num_points=128`` gives ``--num-points 128``; ``True`` a bare flag."""
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


# The small student and batch that the end-to-end and fault tests train on the demo store with.
DEMO_TRAIN = dict(
    dim=48, depth=2, heads=2, num_points=512, num_group=16, group_size=8, batch_size=2, warmup_epochs=1, device="cpu"
)

# The tiny student the unit tests build and train (the one model config they share).
TINY_STUDENT = dict(
    num_points=128, num_group=16, group_size=8, dim=48, depth=2, heads=4, num_concepts=4, head_hidden=32
)
