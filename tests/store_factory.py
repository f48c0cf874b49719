"""Small synthetic pair stores for tests and benchmarks (random teacher, learnable targets).

``make_store(path)`` writes a complete pkd-pairs store: clouds are anisotropic Gaussian blobs and the
targets are a fixed random linear function of each cloud's normalised per-axis spread, so a student
can actually learn them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from pkd.common.store import (CLIP_DIM, FORMAT, PATCH_TOKENS, PREFIX_SHAPE, VERSION, create_split, write_shard,
                              write_stats)

COLOR_SIZE = (640, 480)


def _spread(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(1, keepdims=True)
    radius = np.linalg.norm(centred, axis=-1).max(1, keepdims=True)
    return centred.std(1) / radius


def make_store(path: str | Path, n: int = 16, num_points: int = 256, shard_size: int = 4, patch_tokens: bool = True,
               invalid: tuple[int, ...] = (), stats: bool = True, seed: int = 0, split: str = "train",
               color_size: tuple[int, int] | None = COLOR_SIZE, add_split: bool = False) -> Path:
    """Write a complete synthetic store at ``path`` with ``n`` samples of ``num_points`` points
    (``add_split``: add ``split`` to the store already at ``path``)."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="a" if add_split else "w")
    prep = {"num_points": num_points, "seed": seed}
    root.attrs.update({"format": FORMAT, "version": VERSION, "prep": prep,
                       "teacher": {"name": "synthetic", "random": True}})
    group = create_split(root, split, n, shard_size, num_points, scenes=["s"], patch_tokens=patch_tokens)
    if color_size:
        group.attrs["color_sizes"] = [list(color_size)]
    prefix_map = rng.normal(size=(3, int(np.prod(PREFIX_SHAPE)))).astype(np.float32)
    clip_map = rng.normal(size=(3, CLIP_DIM)).astype(np.float32)
    prefixes = []
    for shard, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        points = rng.normal(size=(m, num_points, 3)) * rng.uniform(0.2, 2.0, size=(m, 1, 3)) + rng.normal(size=(m, 1, 3))
        points = points.astype(np.float32)
        valid = np.array([start + i not in invalid for i in range(m)])
        pixels = np.stack([rng.integers(0, COLOR_SIZE[0], (m, num_points)),
                           rng.integers(0, COLOR_SIZE[1], (m, num_points))], -1).astype(np.uint16)
        write_shard(group, shard, "geometry", {
            "points": points, "colors": rng.integers(0, 256, (m, num_points, 3), dtype=np.uint8), "pixels": pixels,
            "in_view": rng.random((m, num_points)) < 0.8, "pose": np.tile(np.eye(4, dtype=np.float32), (m, 1, 1)),
            "scene": np.zeros(m, np.int32), "frame": np.arange(start, start + m, dtype=np.int32), "valid": valid,
        }, skipped={})
        feats = (_spread(points) - 0.4) * 5
        prefix = (feats @ prefix_map).reshape(m, *PREFIX_SHAPE)
        prefixes.append(prefix.astype(np.float16)[valid])
        teacher = {"prefix": prefix.astype(np.float16), "clip_embed": (feats @ clip_map).astype(np.float16)}
        if patch_tokens:
            teacher["patch_tokens"] = rng.normal(size=(m, PATCH_TOKENS, CLIP_DIM)).astype(np.float16)
        write_shard(group, shard, "teacher", teacher)
    if stats:
        valid_prefix = np.concatenate(prefixes).astype(np.float64)
        write_stats(group, "prefix", valid_prefix.mean(0), valid_prefix.std(0))
    return Path(path)
