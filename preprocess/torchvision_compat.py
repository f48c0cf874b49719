"""Import open_clip (and transformers' vision utilities) where torchvision's compiled ops cannot load.

A CPU-only torch beside a CUDA torchvision wheel leaves ``torchvision/_C.so`` unloadable. torchvision
then skips its op registrations except two unguarded ``register_fake("torchvision::nms" / "qnms")``
decorators in ``_meta_registrations.py``, which raise "operator torchvision::nms does not exist" and
abort ``import torchvision`` — and with it ``import open_clip`` and transformers' image utilities.
pkd only needs torchvision's transforms, so on that error we define the two missing op schemas
(calling them raises NotImplementedError) and import again. Where torchvision loads normally this
module does nothing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# Schemas as torchvision's C++ extension declares them (torchvision/csrc/ops/nms.cpp, quantized/qnms).
_MISSING_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _is_missing_op_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "operator torchvision::" in str(exc) and "does not exist" in str(exc)


def _unavailable(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name} is unavailable: torchvision's compiled ops do not load with this torch "
            f"({torch.__version__}); install the torchvision wheel built for it."
        )

    return kernel


def _define_missing_ops() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _MISSING_OPS.items():
        if not _op_exists(name):
            lib.define(name + schema)
            lib.impl(name, _unavailable(name), "CompositeExplicitAutograd")
    _LIBRARY = lib


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> ModuleType:
    """Import torchvision, working around unloadable compiled ops; returns the module."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if not _is_missing_op_error(exc):
            raise
        log.debug(
            "torchvision's compiled ops did not load (%s); defining stub ops so its transforms "
            "import. Detection ops such as nms stay unavailable.",
            exc,
        )
    _forget_partial_import()
    _define_missing_ops()
    return importlib.import_module("torchvision")


def import_open_clip() -> ModuleType:
    """Return the ``open_clip`` module; every pkd import of open_clip goes through here."""
    ensure_torchvision()
    return importlib.import_module("open_clip")
