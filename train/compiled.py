"""``--compile``: ``torch.compile`` of the training forward where it helps, and a clear refusal where it cannot run.

On a GPU the student's step is launch-bound (the 64-iteration FPS loop, many small kernels), so compiling
the forward (tokenizer, encoder, head or decoder; backward follows through AOTAutograd) fuses those
kernels; on CPU the step is compute-bound and inductor's C++ build costs minutes, so ``auto`` compiles on
CUDA only. Shapes are static (``dynamic=False``): the loader yields full batches only (``StoreLoader``
drops the partial tail), and the held-out pass runs the eager model. Mode: inductor's default (fusion
without CUDA graphs: those would need static input addresses and graph-safe RNG for drop-path;
``reduce-overhead`` is untried). ``fallback_random`` keeps drop-path masks on torch's own RNG, so a compiled
step draws what the eager one draws and resumed runs continue as they do eagerly. The distill student
compiles to one graph; reconstruction variants break it at their boolean-mask indexing (seven breaks).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, cast

import torch
from torch import nn

from pkd.common.errors import ConfigError

COMPILE_CHOICES = ("auto", "on", "off")
ESCAPE = "pass --compile off to train without it"
log = logging.getLogger(__name__)


def resolve(choice: str, device: torch.device) -> str:
    """``--compile choice`` made explicit for ``device``: ``on`` or ``off`` (``auto``: on for CUDA where it can run).

    ``on`` where the platform cannot compile is a ConfigError naming ``--compile off``; ``auto`` falls back
    to eager there with a warning saying why.
    """
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return "off"
    reason = cannot_compile(device)
    if reason is None:
        return "on"
    if choice == "on":
        raise ConfigError(f"--compile on: torch.compile cannot run on {device} here ({reason}); {ESCAPE}.")
    log.warning("torch.compile is off: %s (--compile auto trains eagerly).", reason)
    return "off"


def cannot_compile(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` on this machine (None: it can)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if torch.cuda.get_device_capability(device) < (7, 0):
            return f"{torch.cuda.get_device_name(device)} is older than compute capability 7.0, which Triton needs"
        return None if has_triton() else "Triton is not installed"
    compiler = os.environ.get("CXX", "c++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH"


def compile_forward(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``module`` compiled (static shapes, drop-path on torch's RNG); ``backend`` aot_eager: the tests' CPU check."""
    torch._inductor.config.fallback_random = True
    return Explained(cast(nn.Module, torch.compile(module, dynamic=False, backend=backend)))


class Explained(nn.Module):
    """A compiled module whose compile failure (raised lazily, at the first call) is a ConfigError naming the
    escape, not a page of inductor traceback."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any) -> Any:
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise ConfigError(f"torch.compile failed on this platform ({exc.inner_exception!r}); {ESCAPE}.") from exc
