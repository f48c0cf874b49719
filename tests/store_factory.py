"""Small synthetic pair stores for tests and benchmarks (random teacher, learnable targets).

``make_store(path)`` writes a complete pkd-pairs store: clouds are anisotropic Gaussian blobs and the
targets are a fixed random linear function of each cloud's normalised per-axis spread, so a student
can actually learn them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import zarr

from pkd.common.config import to_plain
from pkd.common.store import (
    CLIP_DIM,
    PATCH_TOKENS,
    PREFIX_SHAPE,
    RootAttrs,
    SplitAttrs,
    TargetArrayAttrs,
    TargetSetAttrs,
    TeacherAttrs,
    TransformAttrs,
    create_split,
    create_target_set,
    int_attr,
    root_attrs,
    shard_ranges,
    split_group,
    splits_of,
    target_path,
    write_root_attrs,
    write_set_shard,
    write_shard,
    write_stats,
)
from pkd.preprocess.frame_sample import GeometryConfig
from pkd.preprocess.prep import PrepConfig
from pkd.train.config import TrainConfig
from pkd.train.model import StudentConfig
from pkd.train.variants import variant_spec

from _cli import TINY_STUDENT

COLOR_SIZE = (640, 480)
CLIPCAP_SHAPES = {"prefix": PREFIX_SHAPE, "clip_embed": (CLIP_DIM,), "patch_tokens": (PATCH_TOKENS, CLIP_DIM)}


def clipcap_target_shape(variant: str) -> tuple[int, ...] | None:
    """The sample shape of the default-set array ``variant`` regresses in these stores (None: it regresses none),
    for tests that build a ``Student`` without a store."""
    target = variant_spec(variant).target
    return None if target is None else CLIPCAP_SHAPES[target]


def synthetic_transform(image_size: int = 224, center_crop: int = 224) -> TransformAttrs:
    """A teacher transform: resize the shortest side to ``image_size``, centre crop ``center_crop`` (OpenAI's)."""
    return TransformAttrs(
        image_size=image_size,
        resize=f"shortest side to {image_size}",
        interpolation="bicubic",
        center_crop=center_crop,
        mean=(0.481, 0.458, 0.408),
        std=(0.269, 0.261, 0.276),
        steps=(),
    )


def synthetic_teacher(seed: int, patch_tokens: bool) -> TeacherAttrs:
    """The identity recorded for the synthetic targets: a random teacher with OpenAI's 224-pixel transform."""
    transform = synthetic_transform()
    return TeacherAttrs(
        clip_model="synthetic",
        mapper="random linear map of the cloud's spread",
        kind="random",
        random=True,
        seed=seed,
        clip_weights=None,
        clip_weights_sha256=None,
        clipcap_weights=None,
        clipcap_weights_sha256=None,
        precision="fp32",
        device="cpu",
        clip_embed="random linear",
        patch_tokens="random" if patch_tokens else None,
        transform=transform,
        open_clip_version="none",
    )


def _spread(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(1, keepdims=True)
    radius = np.linalg.norm(centred, axis=-1).max(1, keepdims=True)
    return centred.std(1) / radius


def make_store(
    path: str | Path,
    n: int = 16,
    num_points: int = 256,
    shard_size: int = 4,
    patch_tokens: bool = True,
    invalid: tuple[int, ...] = (),
    stats: bool = True,
    seed: int = 0,
    split: str = "train",
    color_size: tuple[int, int] | None = COLOR_SIZE,
    add_split: bool = False,
) -> Path:
    """Write a complete synthetic store at ``path`` with ``n`` samples of ``num_points`` points
    (``add_split``: add ``split`` to the store already at ``path``)."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="a" if add_split else "w")
    if not add_split:
        prep = PrepConfig(
            root="synthetic",
            split=split,
            shard_size=shard_size,
            seed=seed,
            geometry=GeometryConfig(num_points=num_points),
        )
        write_root_attrs(
            root,
            RootAttrs(
                prep=to_plain(prep), teacher=synthetic_teacher(seed, patch_tokens), versions={}, status="complete"
            ),
        )
    attrs = SplitAttrs(
        scenes=("s",),
        num_samples=n,
        shard_size=shard_size,
        color_sizes=(color_size,) if color_size else (),
        skipped={},
        valid=n - len(invalid),
    )
    group = create_split(root, split, attrs, num_points, patch_tokens=patch_tokens)
    prefix_map = rng.normal(size=(3, int(np.prod(PREFIX_SHAPE)))).astype(np.float32)
    clip_map = rng.normal(size=(3, CLIP_DIM)).astype(np.float32)
    targets: dict[str, list[np.ndarray]] = {"prefix": [], "clip_embed": []}
    for shard, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        spread, offset = rng.uniform(0.2, 2.0, size=(m, 1, 3)), rng.normal(size=(m, 1, 3))
        points = (rng.normal(size=(m, num_points, 3)) * spread + offset).astype(np.float32)
        valid = np.array([start + i not in invalid for i in range(m)])
        pixels = np.stack(
            [rng.integers(0, COLOR_SIZE[0], (m, num_points)), rng.integers(0, COLOR_SIZE[1], (m, num_points))], -1
        ).astype(np.uint16)
        write_shard(
            group,
            shard,
            "geometry",
            {
                "points": points,
                "colors": rng.integers(0, 256, (m, num_points, 3), dtype=np.uint8),
                "pixels": pixels,
                "in_view": rng.random((m, num_points)) < 0.8,
                "pose": np.tile(np.eye(4, dtype=np.float32), (m, 1, 1)),
                "scene": np.zeros(m, np.int32),
                "frame": np.arange(start, start + m, dtype=np.int32),
                "valid": valid,
            },
            skipped={},
        )
        feats = (_spread(points) - 0.4) * 5
        prefix = (feats @ prefix_map).reshape(m, *PREFIX_SHAPE)
        teacher = {"prefix": prefix.astype(np.float16), "clip_embed": (feats @ clip_map).astype(np.float16)}
        for name, kept in targets.items():
            kept.append(teacher[name][valid])
        if patch_tokens:
            teacher["patch_tokens"] = rng.normal(size=(m, PATCH_TOKENS, CLIP_DIM)).astype(np.float16)
        write_shard(group, shard, "teacher", teacher)
    if stats:  # as prep's finalize records them: per dimension over the valid samples
        for name, kept in targets.items():
            values = np.concatenate(kept).astype(np.float64)
            write_stats(group, name, values.mean(0), values.std(0))
    return Path(path)


def add_target_set(
    path: str | Path,
    name: str,
    arrays: dict[str, tuple[int, ...]],
    seed: int = 0,
    transform: TransformAttrs | None = None,
) -> dict[str, object]:
    """Add the target set ``name`` to every split of the store at ``path`` through the store API: random float16
    ``arrays`` (sample shapes by array name), their stats, and its root attrs entry, whose made-up teacher
    identity is marked random. Returns that identity."""
    root = zarr.open_group(str(path), mode="a")
    specs = {a: TargetArrayAttrs(shape=shape, dtype="float16", meaning="random normal") for a, shape in arrays.items()}
    teacher: dict[str, object] = {"kind": f"synthetic:{name}", "random": True, "seed": seed}
    rng = np.random.default_rng(seed)
    for split in splits_of(root):
        group = split_group(root, split)
        create_target_set(group, name, specs)
        ranges = shard_ranges(int_attr(group, "num_samples"), int_attr(group, "shard_size"))
        values = {a: rng.normal(size=(ranges[-1][1], *shape)).astype(np.float16) for a, shape in arrays.items()}
        for shard, (start, stop) in enumerate(ranges):
            write_set_shard(group, name, shard, {a: v[start:stop] for a, v in values.items()})
        for a, v in values.items():
            write_stats(group, target_path(name, a), v.astype(np.float64).mean(0), v.astype(np.float64).std(0))
    attrs = root_attrs(root)
    added = TargetSetAttrs(
        teacher=teacher, device="cpu", transform=transform or synthetic_transform(), arrays=specs, status="complete"
    )
    write_root_attrs(root, dataclasses.replace(attrs, targets={**attrs.targets, name: added}))
    return teacher


def tiny_config(store: Path | str, **kw) -> TrainConfig:
    """A two-epoch run of the tiny test student on ``store`` (batch 4), the run, record and compile tests' base."""
    return TrainConfig(
        store=str(store), model=StudentConfig(**TINY_STUDENT), epochs=2, warmup_epochs=1, batch_size=4, **kw
    )
