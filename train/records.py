"""Versioned run records: every ``config.json`` and checkpoint names its format and version, as the pair store does.

A record kind (``RecordKind``) declares its format name, the top-level keys a record of it holds, and its
upgrade table: ``kind.step(fn)`` registers ``fn`` as the upgrade from the current version to the next, so the
table is read top to bottom where the kind is declared, and a later module (a benchmark) can add a step the same
way. Records written before versioning (no ``format``/``version`` keys) are version 1. Reading is strict
(``upgrade``): an unknown key is a ConfigError naming the file and the key, a record of a newer version is
refused naming the pkd that wrote it; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pkd.common import durable
from pkd.common.errors import ConfigError

Record = dict[str, Any]
Step = Callable[[Record], Record]
UNVERSIONED = 1  # the version of records written before they carried one


class RecordKind:
    """One kind of run record: its format name, the top-level keys it may hold and its upgrade steps."""

    def __init__(self, name: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
        self.name = name
        self.required = frozenset(required)
        self.optional = frozenset(optional)
        self.upgrades: dict[int, Step] = {}  # upgrades[v] turns a record of version v into one of v + 1

    @property
    def version(self) -> int:
        """The version this pkd writes: one past the last declared upgrade."""
        return UNVERSIONED + len(self.upgrades)

    def step(self, fn: Step) -> Step:
        """Declare ``fn`` the upgrade from the current version to the next (usable as a decorator)."""
        self.upgrades[self.version] = fn
        return fn

    def stamp(self, record: Mapping[str, Any]) -> Record:
        """``record`` with this kind's format and current version first, as it is written."""
        return {"format": self.name, "version": self.version, **record}

    def upgrade(self, record: Mapping[str, Any], where: str | Path) -> Record:
        """``record`` (as read from ``where``) upgraded to the current version, without its format/version keys.

        ConfigError for another format, a newer version, or a key this kind does not declare (or lacks).
        """
        body = dict(record)
        fmt, version = body.pop("format", self.name), body.pop("version", UNVERSIONED)
        if fmt != self.name:
            raise ConfigError(f"{where} is a {fmt!r} record, not {self.name!r}; pass the file pkd wrote for this.")
        if not isinstance(version, int) or not UNVERSIONED <= version <= self.version:
            code = body.get("code")
            writer = code.get("pkd", "unknown") if isinstance(code, Mapping) else "unknown"
            raise ConfigError(
                f"{where} is {self.name} version {version} (written by pkd {writer}); this pkd reads versions "
                f"{UNVERSIONED}-{self.version}. Install pkd {writer} to use it, or start a new run."
            )
        for v in range(version, self.version):
            body = self.upgrades[v](body)
        unknown = sorted(set(body) - self.required - self.optional)
        missing = sorted(self.required - set(body))
        if unknown or missing:
            keys = "; ".join(
                part for part in (unknown and f"unknown keys {unknown}", missing and f"missing keys {missing}") if part
            )
            raise ConfigError(
                f"{where} is not a valid {self.name} version {self.version} record ({keys}); it was written by "
                "another pkd: use that one, or start a new run."
            )
        return body


def read_record(path: Path, kind: RecordKind) -> Record:
    """The JSON record at ``path`` (a run's config.json) upgraded to ``kind``'s current version (``upgrade``)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); it is damaged or not a pkd run record.") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a pkd run record (expected a JSON object).")
    return kind.upgrade(raw, path)


def write_record(path: Path, kind: RecordKind, record: Mapping[str, Any]) -> None:
    """Write ``record`` as JSON at ``path``, stamped with ``kind``'s format and version."""
    durable.write_atomic(Path(path), json.dumps(kind.stamp(record), indent=2, default=str) + "\n")


def known_fields(fields: Iterable[str], values: Mapping[str, Any], where: str) -> None:
    """ConfigError naming ``where`` and each key of ``values`` that is not in ``fields``."""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where} holds unknown settings {unknown}; it was written by another pkd: use that one, "
            "or start a new run."
        )
