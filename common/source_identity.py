"""The identity of a cache's source files, so a cache never serves another data root's scene or an older file's.

A cached item records ``fingerprint(files)`` (resolved path, size and mtime_ns of each file); ``changed``
compares that record with the files on disk. A cache folder named with ``root_key(data)`` belongs to one
resolved data root, so two roots never share one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pkd.common.store import _Plain


@dataclass(frozen=True, kw_only=True)
class FileIdentity(_Plain):
    """One source file as it was read: resolved path, size in bytes, modification time in nanoseconds."""

    path: str
    size: int
    mtime_ns: int


def identity(path: Path) -> FileIdentity | None:
    """The identity of ``path`` now; None when it is not a file."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return None
    return FileIdentity(path=str(resolved), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def fingerprint(files: Iterable[Path]) -> tuple[FileIdentity, ...]:
    """The identities of ``files`` (each must exist: fingerprint after reading them)."""
    found = []
    for path in files:
        now = identity(path)
        if now is None:
            raise FileNotFoundError(f"{path} vanished while it was being read")
        found.append(now)
    return tuple(found)


def changed(recorded: Sequence[FileIdentity]) -> list[str]:
    """Paths of the recorded files that are gone or whose size or mtime differ from the record."""
    return [file.path for file in recorded if identity(Path(file.path)) != file]


def root_key(root: Path) -> str:
    """8 hex digits naming the resolved data root ``root`` (part of a cache's folder name)."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
