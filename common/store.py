"""The "pkd-pairs" store: one Zarr v3 group per split of (point cloud, teacher target) samples.

Layout of ``pairs.zarr`` (format documented here, next to the code that writes and checks it)::

    attrs: format, version, prep (geometry config + seed), teacher (identity), versions
    <split>/                    train, val or test; attrs: scenes, color_sizes (w, h per scene: the
                                teacher crop of ``pixels`` follows from it), shard_size, skipped, valid
        points      (N, P, 3)   float32  world-frame xyz, metres
        colors      (N, P, 3)   uint8    RGB from the color frame
        pixels      (N, P, 2)   uint16   (u, v) of each point in the color image
        in_view     (N, P)      bool     point lies inside the teacher's centre crop
        pose        (N, 4, 4)   float32  camera-to-world
        scene       (N,)        int32    index into the split's ``scenes`` attr
        frame       (N,)        int32    original frame number
        valid       (N,)        bool     False where the planned frame could not be decoded
        prefix      (N, 10, 768) float16 ClipCap prefix: the distillation target
        clip_embed  (N, 512)    float16  unnormalised CLIP image embedding
        patch_tokens (N, 49, 512) float16 optional: CLIP patch tokens after ln_post/proj
        done_geometry (shards,) uint8    1 once a shard's geometry arrays are written
        done_teacher  (shards,) uint8    1 once a shard's teacher arrays are written
        skipped_counts (shards, R) int32 per-shard counts of frames that failed to decode
        stats/{prefix,clip_embed}_{mean,std}  float32  per-dimension statistics of the valid targets
                                (small arrays rather than attrs: 16k floats as JSON would bloat every
                                attrs rewrite and lose precision)

Every array has an inner chunk of one sample (cheap random reads) inside shards of ``shard_size``
samples. Writers write a whole shard in one assignment per array and then its done flag, so a shard
either counts completely or not at all; two writers never touch the same shard. Each inner chunk
carries a CRC32C checksum, so a flipped byte fails on read instead of being learnt from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from pkd.common.errors import StoreError

FORMAT = "pkd-pairs"
VERSION = 1
SPLITS = ("train", "val", "test")
PREFIX_SHAPE = (10, 768)
CLIP_DIM = 512
PATCH_TOKENS = 49
SKIP_REASONS = ("invalid_pose", "non_rigid_pose", "too_few_depth", "undecodable")
STAGES = ("geometry", "teacher")


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array: its name, the shape of one sample, dtype and which stage writes it."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str
    stage: str


def array_specs(num_points: int, patch_tokens: bool = False) -> list[ArraySpec]:
    """The per-sample arrays of a split, in the order the module docstring lists them."""
    p = num_points
    specs = [
        ArraySpec("points", (p, 3), "float32", "geometry"),
        ArraySpec("colors", (p, 3), "uint8", "geometry"),
        ArraySpec("pixels", (p, 2), "uint16", "geometry"),
        ArraySpec("in_view", (p,), "bool", "geometry"),
        ArraySpec("pose", (4, 4), "float32", "geometry"),
        ArraySpec("scene", (), "int32", "geometry"),
        ArraySpec("frame", (), "int32", "geometry"),
        ArraySpec("valid", (), "bool", "geometry"),
        ArraySpec("prefix", PREFIX_SHAPE, "float16", "teacher"),
        ArraySpec("clip_embed", (CLIP_DIM,), "float16", "teacher"),
    ]
    if patch_tokens:
        specs.append(ArraySpec("patch_tokens", (PATCH_TOKENS, CLIP_DIM), "float16", "teacher"))
    return specs


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Sample ranges [start, stop) of each shard of a split with n samples."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _compressors() -> tuple:
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())


def create_split(
    root: zarr.Group,
    split: str,
    n: int,
    shard_size: int,
    num_points: int,
    scenes: list[str],
    patch_tokens: bool = False,
) -> zarr.Group:
    """Create an empty split group sized for n planned samples (n may be 0)."""
    group = root.create_group(split)
    group.attrs.update({"scenes": scenes, "shard_size": shard_size, "num_samples": n})
    num_shards = len(shard_ranges(n, shard_size))
    for spec in array_specs(num_points, patch_tokens):
        _create_sample_array(group, spec, n, shard_size)
    for stage in STAGES:
        group.create_array(f"done_{stage}", shape=(num_shards,), chunks=(1,), dtype="uint8", fill_value=0)
    group.create_array(
        "skipped_counts", shape=(num_shards, len(SKIP_REASONS)), chunks=(1, len(SKIP_REASONS)),
        dtype="int32", fill_value=0,
    )
    return group


def _create_sample_array(group: zarr.Group, spec: ArraySpec, n: int, shard_size: int) -> zarr.Array:
    chunk = (1, *spec.sample_shape)
    return group.create_array(
        spec.name,
        shape=(n, *spec.sample_shape),
        chunks=chunk,
        shards=(max(1, min(shard_size, n)), *spec.sample_shape),
        dtype=spec.dtype,
        fill_value=0,
        compressors=_compressors(),
    )


def add_array(group: zarr.Group, spec: ArraySpec) -> zarr.Array:
    """Add an optional per-sample array (e.g. patch_tokens) to an existing split."""
    return _create_sample_array(group, spec, int(group.attrs["num_samples"]), int(group.attrs["shard_size"]))


def write_shard(
    group: zarr.Group,
    shard: int,
    stage: str,
    data: Mapping[str, np.ndarray],
    skipped: Mapping[str, int] | None = None,
) -> None:
    """Write one whole shard of a stage's arrays, then mark it done.

    ``data`` must hold every array of the stage for exactly the shard's samples; the done flag is
    written last, so an interrupted write leaves the shard not done and a rerun rewrites it whole.
    """
    start, stop = shard_ranges(int(group.attrs["num_samples"]), int(group.attrs["shard_size"]))[shard]
    for name, values in data.items():
        with zarr.config.set({"array.write_empty_chunks": True}):  # a file per shard: see missing_shards
            array = group[name]
        if values.shape != (stop - start, *array.shape[1:]):
            raise ValueError(f"shard {shard} of {name!r}: got shape {values.shape}, expected "
                             f"{(stop - start, *array.shape[1:])}")
        array[start:stop] = values
    if skipped is not None:
        group["skipped_counts"][shard] = np.array([skipped.get(r, 0) for r in SKIP_REASONS], dtype="int32")
    group[f"done_{stage}"][shard] = 1


def done_shards(group: zarr.Group, stage: str) -> np.ndarray:
    """Boolean per shard: has this stage been written completely?"""
    return group[f"done_{stage}"][:].astype(bool)


async def _keys(group: zarr.Group) -> set[str]:
    return {key async for key in group.store.list_prefix(f"{group.path}/")}


def missing_shards(group: zarr.Group) -> list[tuple[str, int]]:
    """(array, shard) for every shard a done flag promises but whose file is gone.

    zarr reads an absent chunk back as its fill value (zeros), so a deleted file would otherwise pass as
    data. Writers write even all-zero chunks (``write_shard``), so every done shard has one file per
    array; one listing of the split finds them all.
    """
    keys = sync(_keys(group))
    stages = {spec.name: spec.stage for spec in array_specs(0, patch_tokens=True)}
    done = {stage: done_shards(group, stage) for stage in STAGES}
    missing = []
    for name, array in group.arrays():
        if name not in stages:
            continue
        for shard in np.flatnonzero(done[stages[name]]):
            key = array.metadata.encode_chunk_key((int(shard),) + (0,) * (array.ndim - 1))
            if f"{group.path}/{name}/{key}" not in keys:
                missing.append((name, int(shard)))
    return missing


def reset_stage(group: zarr.Group, stage: str) -> None:
    """Mark every shard of a stage as not done, e.g. before recomputing targets with another teacher."""
    flags = group[f"done_{stage}"]
    flags[:] = 0


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing pair store, checking that it is a pkd-pairs store of a version we read."""
    if not _is_remote(path) and not Path(path).exists():
        raise StoreError(f"no pair store at {path}: create one with `pkd-prep scannet --root SCANNET --out {path}` "
                         "(a synthetic scene to try it on: `pkd-prep demo-scene --out DIR`).")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise StoreError(f"{path} is not a Zarr v3 group ({exc}); pass a store written by pkd-prep.") from exc
    fmt, version = root.attrs.get("format"), root.attrs.get("version")
    if fmt != FORMAT:
        raise StoreError(f"{path} is not a pkd pair store (format={fmt!r}, expected {FORMAT!r}); "
                         "pass a store written by pkd-prep.")
    if version != VERSION:
        raise StoreError(f"{path} is pkd-pairs version {version}, this pkd reads version {VERSION}; "
                         "re-run pkd-prep with this version or install the pkd that wrote it.")
    return root


def splits_of(root: zarr.Group) -> list[str]:
    """Names of the splits present in a store, in canonical order."""
    present = {name for name, _ in root.groups()}
    return [s for s in SPLITS if s in present]


def open_split(path: str | Path, split: str, require: tuple[str, ...] = ()) -> zarr.Group:
    """Open one complete split for reading; ``require`` names arrays a consumer needs."""
    root = open_store(path)
    if split not in splits_of(root):
        held = ", ".join(f"{name} ({root[name].attrs['num_samples']} samples)" for name in splits_of(root)) or "none"
        example = (splits_of(root) or ["test"])[0]
        raise StoreError(f"{path} has no split {split!r}; it holds {held}. Pass --split with one of those (e.g. "
                         f"--split {example}), or prep a store from scenes of split {split!r}: pkd-prep assigns "
                         "splits from the official ScanNet v2 lists (scans_test/ scenes are test).")
    group = root[split]
    for stage in STAGES:
        done = done_shards(group, stage)
        if not done.all():
            raise StoreError(f"{path}/{split}: {int((~done).sum())} of {done.size} shards lack their {stage} "
                             "arrays; rerun the same pkd-prep command to finish them.")
    present = {name for name, _ in group.arrays()}
    for name in require:
        if name not in present:
            hint = " (prep with --patch-tokens)" if name == "patch_tokens" else ""
            raise StoreError(f"{path}/{split} has no array {name!r}{hint}.")
    missing = missing_shards(group)
    if missing:
        raise StoreError(f"{path}/{split}: {len(missing)} shard file(s) are missing, e.g. {missing[0][0]} shard "
                         f"{missing[0][1]}; they would read back as zeros. Run `pkd-prep verify {path}` and rebuild "
                         "the store (rerun the prep with --overwrite, or restore it from a copy).")
    return group


def read_shard(group: zarr.Group, name: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of one array; a chunk failing its checksum or codec raises a StoreError
    naming the array, shard and sample range, so nothing downstream learns from corrupt bytes."""
    try:
        return group[name][start:stop]
    except Exception as exc:  # codecs raise many types (ValueError, RuntimeError, blosc errors)
        shard = start // int(group.attrs["shard_size"])
        raise StoreError(f"{group.store}/{group.path}/{name}: shard {shard} (samples {start}-{stop - 1}) is "
                         f"corrupt ({type(exc).__name__}: {exc}). Run `pkd-prep verify` on the store and rebuild "
                         "it (rerun the prep with --overwrite, or restore it from a copy).") from exc


def write_stats(group: zarr.Group, name: str, mean: np.ndarray, std: np.ndarray) -> None:
    """Store per-dimension mean/std of a target array (shape of one sample)."""
    stats = group.require_group("stats")
    for kind, values in (("mean", mean), ("std", std)):
        stats.create_array(f"{name}_{kind}", data=np.asarray(values, dtype="float32"), overwrite=True)


def read_stats(group: zarr.Group, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-dimension (mean, std) of a target array, or None if the split has none recorded."""
    if "stats" not in group or f"{name}_mean" not in group["stats"]:
        return None
    return group["stats"][f"{name}_mean"][...], group["stats"][f"{name}_std"][...]


def iter_shards(group: zarr.Group) -> Iterator[tuple[int, int, int]]:
    """(shard index, start, stop) of every shard of a split."""
    for i, (start, stop) in enumerate(shard_ranges(int(group.attrs["num_samples"]), int(group.attrs["shard_size"]))):
        yield i, start, stop
