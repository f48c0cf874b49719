"""Stage configs as plain data: conversion to JSON-able dicts, differences, package versions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

RECORDED_PACKAGES = ("pkd", "numpy", "zarr", "torch", "open_clip_torch", "fpsample", "opencv-python-headless")


def to_plain(value: Any) -> Any:
    """A JSON-able copy of a (nested) dataclass, with tuples as lists and paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two plain configs, one "key: old -> new" line each."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def option(default: Any, help: str, *, run: bool = False) -> Any:
    """A dataclass field carrying its command-line help; ``run=True`` marks a run option (one that does not
    change what is computed, so a resumed run may change it). CLIs derive their options from such fields."""
    return dataclasses.field(default=default, metadata={"help": help, "run": run})


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour a store or run depends on."""
    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
