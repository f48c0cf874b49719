"""Stage configs as plain data: conversion to and from JSON-able dicts, differences, package versions."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from pkd.common.errors import ConfigError

RECORDED_PACKAGES = ("pkd", "numpy", "zarr", "torch", "open_clip_torch", "fpsample", "opencv-python-headless")

T = TypeVar("T")


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


def from_plain(cls: type[T], data: Any, where: str) -> T:
    """The dataclass ``cls`` rebuilt from what ``to_plain`` wrote, nested dataclasses and tuples included.

    Every field must be present and no other: a renamed or dropped field is a ConfigError naming
    ``where`` and the fields, never a TypeError from the constructor.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown, missing = sorted(set(data) - set(fields)), sorted(set(fields) - set(data))
    if unknown or missing:
        raise ConfigError(f"{where} does not match {cls.__name__}: unknown fields {unknown}, missing fields {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` shaped as the type ``hint`` says: dataclasses rebuilt (mapping values too), lists as tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_plain(typing.cast(type, hint), value, where)
    if origin in (Mapping, dict) and len(args) == 2 and isinstance(value, Mapping):
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ConfigError(f"{where}: expected {len(items)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value)))
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


def flag(name: str) -> str:
    """The command-line spelling of field or parameter ``name``."""
    return "--" + name.replace("_", "-")


def at_least(lowest: int, **values: int | None) -> None:
    """ConfigError naming the option (``--name``) of the first value below ``lowest``; None (not given) passes."""
    for name, value in values.items():
        if value is not None and value < lowest:
            raise ConfigError(f"{flag(name)} must be at least {lowest}, got {value}.")


def choice(allowed: tuple[str, ...], **values: str) -> None:
    """ConfigError naming the option (``--name``) of the first value not in ``allowed``, and the choices."""
    for name, value in values.items():
        if value not in allowed:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}.")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour a store or run depends on."""
    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
