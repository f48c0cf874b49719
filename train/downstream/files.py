"""File helpers shared by the dataset loaders: existence checks with actionable errors, text point files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pkd.common.errors import DataError


def require_dir(path: Path, what: str, fix: str) -> Path:
    """``path`` if it is a directory, else a DataError naming it, what it should be and ``fix``."""
    if not path.is_dir():
        raise DataError(f"{path} is not a directory; expected {what}. {fix}")
    return path


def require_file(path: Path, what: str, fix: str) -> Path:
    """``path`` if it is a file, else a DataError naming it, what it should be and ``fix``."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {what}. {fix}")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_point_file(path: Path, delimiter: str | None, min_columns: int) -> np.ndarray:
    """A (rows, columns) float32 table from a text point file; DataError if unreadable or too narrow."""
    try:
        table = np.loadtxt(path, delimiter=delimiter, dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot parse {path} as a point table ({exc}); the file is damaged or of another "
            "format. Re-extract the dataset archive."
        ) from exc
    if table.shape[0] == 0 or table.shape[1] < min_columns:
        raise DataError(
            f"{path} has shape {table.shape}, expected rows of at least {min_columns} columns; "
            "the file is damaged or of another format. Re-extract the dataset archive."
        )
    return table


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre a (P, 3) cloud at its mean and scale its farthest point onto the unit sphere (``pc_normalize``)."""
    centred = points - points.mean(axis=0, keepdims=True)
    return (centred / max(float(np.linalg.norm(centred, axis=1).max()), 1e-8)).astype(np.float32)
