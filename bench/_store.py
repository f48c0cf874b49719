"""The tests' synthetic store factory (tests/store_factory.py) for the benchmarks.

Loaded from its path, so the benchmarks reuse it without putting tests/ on sys.path (which would shadow any
module there named like a library one) or shipping test support code in the package.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path


def store_factory() -> types.ModuleType:
    """tests/store_factory.py as a module (``make_store``)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "store_factory.py"
    spec = importlib.util.spec_from_file_location("store_factory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
