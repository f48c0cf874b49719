"""The "pkd-pairs" store: one Zarr v3 group per split of (point cloud, teacher target) samples.

This module owns the format: it is the only writer of the store's attrs, which it reads and writes as
the typed dataclasses below (``RootAttrs``, ``TeacherAttrs``, ``SplitAttrs``). Layout of ``pairs.zarr``::

    attrs (RootAttrs)
        format      "pkd-pairs"
        version     schema version (``VERSION``); it covers every attr below, ``prep`` and ``teacher``
                    included: renaming one of their fields bumps it and adds a step to ``_UPGRADES``
        prep        the PrepConfig (pkd.preprocess.config) as plain data: dataset root, split, scenes,
                    source, frame_skip, limit, shard_size, seed, geometry (num_points, sampling, ...),
                    depth_scale
        teacher     TeacherAttrs: model names, weight files and sha256s, precision, device, random + seed,
                    the image transform (``transform.image_size`` is the teacher's centre crop)
        versions    package versions of the writer (pkd, numpy, zarr, torch, ...)
        status      "in-progress" while a prep writes, "complete" once every split is finalized
        targets     TargetSetAttrs by name: the target sets added beside the default one
                    (``pkd-prep teacher --name``), each with its teacher's identity, transform and arrays
    <split>/        train, val or test; attrs (SplitAttrs):
        scenes        scene names; the ``scene`` array indexes them
        num_samples   N, planned samples (invalid ones included)
        shard_size    samples per shard (the unit of writing and resuming)
        skip_reasons  column order of ``skipped_counts``
        color_sizes   (width, height) of each scene's colour frames: with ``transform.image_size`` it
                      gives the teacher's crop of ``pixels``
        plan          fingerprint of the planned samples (a resume checks the dataset did not change)
        plan_skipped  frames dropped at plan time, by reason (unusable pose, ``missing_files``)
        skipped       all skipped frames by reason (plan time + ``skipped_counts``); null until finalized
        valid         number of valid samples; null until finalized
      arrays, first axis the sample (N) or the shard:
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
        skipped_counts (shards, R) int32 per-shard counts of frames that failed to decode, one column
                                 per ``skip_reasons`` entry
        stats/{prefix,clip_embed}_{mean,std}  float32  per-dimension statistics of the valid targets,
                                 written when the split is finalized (small arrays rather than attrs:
                                 16k floats as JSON would bloat every attrs rewrite and lose precision)
      targets/<set>/   one group per added target set (root attr ``targets``):
        <array>     (N, ...)    float16  the set's arrays, sharded as above
        done        (shards,)   uint8    1 once a shard of every array of the set is written
        stats/<array>_{mean,std} float32 as above, written when the set's pass ends

Target sets: the arrays ``prefix``, ``clip_embed`` and ``patch_tokens`` are the default set, ``clipcap``
(``DEFAULT_SET``), whose teacher is the root's ``teacher`` and whose done flag is ``done_teacher``; a trainer
names any array of any set as ``SET/ARRAY`` (``target_path`` gives its path in a split). Adding a set never
touches the geometry or another set's arrays.

Every per-sample array has an inner chunk of one sample (cheap random reads) inside shards of
``shard_size`` samples. Writers write a whole shard in one assignment per array and then its done flag,
so a shard either counts completely or not at all; two writers never touch the same shard. Each inner
chunk carries a CRC32C checksum, so a flipped byte fails on read instead of being learnt from.

Older versions are upgraded when read (``pkd-prep upgrade`` writes the upgrade back); a store of a
newer version is refused with the pkd version that wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pkd.common import durable, geometry
from pkd.common.config import from_plain, to_plain
from pkd.common.errors import ConfigError, StoreError

FORMAT = "pkd-pairs"
VERSION = 3
SPLITS = ("train", "val", "test")
PREFIX_SHAPE = (10, 768)
CLIP_DIM = 512
PATCH_TOKENS = 49
SKIP_REASONS = ("invalid_pose", "non_rigid_pose", "too_few_depth", "undecodable")
MISSING_FILES = "missing_files"  # plan time only (no ``skipped_counts`` column): an exported frame lacks a file
STAGES = ("geometry", "teacher")
CREATING = "creating"  # status until every split's (empty) arrays exist (prep then starts over)
STATUSES = (CREATING, "in-progress", "complete")
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_SET = "clipcap"  # the set prep writes: the arrays of the "teacher" stage, its teacher the root's
SETS_GROUP = "targets"
SET_STATUSES = ("in-progress", "complete")


def is_remote(path: str | Path) -> bool:
    """Whether a store path is a URL (``s3://…``, ``gs://…``, ``memory://…``) rather than a local path."""
    return "://" in str(path)


def store_path(path: str | Path) -> str:
    """A store path as recorded in configs and runs: absolute for local paths, unchanged for URLs."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class _Plain:
    """``to_dict``/``from_dict`` of the attrs dataclasses: the JSON stored in zarr.json and back."""

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], to_plain(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "attrs") -> Any:
        return from_plain(cls, data, where)


@dataclass(frozen=True, kw_only=True)
class TransformAttrs(_Plain):
    """The teacher's image transform: resize the shortest side to ``image_size``, centre crop, normalise."""

    image_size: int
    resize: str
    interpolation: str
    center_crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(self.image_size > 0 and self.center_crop > 0, f"teacher transform sizes must be positive: {self}")


@dataclass(frozen=True, kw_only=True)
class TeacherAttrs(_Plain):
    """Identity of the teacher that computed a store's targets; two stores of equal ``comparable()`` agree."""

    clip_model: str
    mapper: str
    kind: str
    random: bool
    seed: int | None
    clip_weights: str | None
    clip_weights_sha256: str | None
    clipcap_weights: str | None
    clipcap_weights_sha256: str | None
    precision: str
    device: str
    clip_embed: str
    patch_tokens: str | None
    transform: TransformAttrs
    open_clip_version: str

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, f"teacher precision {self.precision!r} is not one of {PRECISIONS}")
        _check(
            self.random == (self.seed is not None),
            f"a random teacher records its seed and only a random one does (random={self.random}, seed={self.seed})",
        )

    def comparable(self) -> dict[str, Any]:
        """What decides the targets: everything but where and with which open_clip release they ran."""
        return {k: v for k, v in self.to_dict().items() if k not in ("device", "open_clip_version")}


@dataclass(frozen=True, kw_only=True)
class TargetArrayAttrs(_Plain):
    """One array of a target set: the shape of one sample, its dtype and what it holds."""

    shape: tuple[int, ...]
    dtype: str
    meaning: str


@dataclass(frozen=True, kw_only=True)
class TargetSetAttrs(_Plain):
    """A target set added beside the default one: who computed it (``teacher``: the teacher kind's identity, all
    that decides the numbers; ``device``: where it ran), the image transform it saw, and its arrays."""

    teacher: Mapping[str, Any]
    device: str
    transform: TransformAttrs
    arrays: Mapping[str, TargetArrayAttrs]
    status: str

    def __post_init__(self) -> None:
        _check(self.status in SET_STATUSES, f"target set status {self.status!r} is not one of {SET_STATUSES}")
        _check(bool(self.arrays), "a target set holds at least one array")


@dataclass(frozen=True, kw_only=True)
class RootAttrs(_Plain):
    """The store's root attrs. ``prep`` is pkd.preprocess.config.PrepConfig as plain data (``to_plain``)."""

    format: str = FORMAT
    version: int = VERSION
    prep: Mapping[str, Any]
    teacher: TeacherAttrs
    versions: Mapping[str, str]
    status: str
    targets: Mapping[str, TargetSetAttrs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(DEFAULT_SET not in self.targets, f"the added target sets may not be called {DEFAULT_SET!r}")
        _check(
            self.format == FORMAT and self.version == VERSION,
            f"format {self.format!r} version {self.version} is not {FORMAT!r} version {VERSION}",
        )
        _check(self.status in STATUSES, f"status {self.status!r} is not one of {STATUSES}")
        num_points = self.prep.get("geometry", {}).get("num_points")
        _check(
            isinstance(num_points, int) and num_points > 0,
            f"prep.geometry.num_points must be a positive integer, got {num_points!r}",
        )

    @property
    def num_points(self) -> int:
        """Points per sample."""
        return int(self.prep["geometry"]["num_points"])


@dataclass(frozen=True, kw_only=True)
class SplitAttrs(_Plain):
    """A split's attrs: what was planned, how it is sharded, and (once finalized) what was skipped."""

    scenes: tuple[str, ...]
    num_samples: int
    shard_size: int
    skip_reasons: tuple[str, ...] = SKIP_REASONS
    color_sizes: tuple[tuple[int, int], ...] = ()
    plan: str | None = None
    plan_skipped: Mapping[str, int] = field(default_factory=dict)
    skipped: Mapping[str, int] | None = None
    valid: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.num_samples >= 0 and self.shard_size > 0,
            f"num_samples {self.num_samples} must be >= 0 and shard_size {self.shard_size} > 0",
        )
        _check(
            len(self.color_sizes) in (0, len(self.scenes)),
            f"{len(self.color_sizes)} color_sizes for {len(self.scenes)} scenes",
        )
        _check(
            self.valid is None or 0 <= self.valid <= self.num_samples,
            f"valid {self.valid} outside 0..{self.num_samples}",
        )
        known = {*self.skip_reasons, MISSING_FILES}
        reasons = set(self.plan_skipped) | set(self.skipped or {})
        _check(
            reasons <= known,
            f"skip reasons {sorted(reasons - known)} are not in skip_reasons {self.skip_reasons} nor {MISSING_FILES!r}",
        )

    @property
    def num_shards(self) -> int:
        return len(shard_ranges(self.num_samples, self.shard_size))


def _upgrade_v1(root: dict[str, Any], splits: dict[str, dict[str, Any]]) -> None:
    """v1 had no ``skip_reasons`` (its columns were today's SKIP_REASONS), wrote optional split attrs only
    once known, and read exported depth in millimetres without a ``depth_scale`` (None: the readers' default)."""
    root["prep"] = {"depth_scale": None, **root.get("prep", {})}
    for attrs in splits.values():
        for key, value in (
            ("skip_reasons", list(SKIP_REASONS)),
            ("color_sizes", []),
            ("plan", None),
            ("plan_skipped", {}),
            ("skipped", None),
            ("valid", None),
        ):
            attrs.setdefault(key, value)


def _upgrade_v2(root: dict[str, Any], splits: dict[str, dict[str, Any]]) -> None:
    """v2 held one target set, the default one (its arrays and ``teacher`` are unchanged in v3)."""
    root.setdefault("targets", {})


# _UPGRADES[v] turns the attrs of version v into those of v + 1, in place.
_UPGRADES: dict[int, Callable[[dict[str, Any], dict[str, dict[str, Any]]], None]] = {1: _upgrade_v1, 2: _upgrade_v2}


@dataclass(frozen=True)
class StoreAttrs:
    """Every attr of a store, typed: the root's and each split's."""

    root: RootAttrs
    splits: dict[str, SplitAttrs]
    read_version: int


def _split_groups(root: zarr.Group) -> dict[str, zarr.Group]:
    present = dict(root.groups())
    return {name: present[name] for name in SPLITS if name in present}


def read_attrs(root: zarr.Group, path: str | Path) -> StoreAttrs:
    """The typed attrs of a store, upgraded from an older version; StoreError if they are not valid."""
    raw = dict(root.attrs)
    fmt, version = raw.get("format"), raw.get("version")
    if fmt != FORMAT:
        raise StoreError(
            f"{path} is not a pkd pair store (format={fmt!r}, expected {FORMAT!r}); pass a store written by pkd-prep."
        )
    versions = raw.get("versions")
    writer = versions.get("pkd", "unknown") if isinstance(versions, Mapping) else "unknown"
    if not isinstance(version, int) or version > VERSION or (version < VERSION and version not in _UPGRADES):
        raise StoreError(
            f"{path} is pkd-pairs version {version} (written by pkd {writer}); this pkd reads versions "
            f"{min(_UPGRADES)}-{VERSION}. Install pkd {writer} to read it, or rebuild the store with "
            "this pkd (`pkd-prep scannet ... --overwrite`)."
        )
    groups = _split_groups(root)
    splits = {name: dict(group.attrs) for name, group in groups.items()}
    for step in range(version, VERSION):
        _UPGRADES[step](raw, splits)
    raw["version"] = VERSION
    try:
        return StoreAttrs(
            RootAttrs.from_dict(raw, "root attrs"),
            {name: SplitAttrs.from_dict(attrs, f"{name} attrs") for name, attrs in splits.items()},
            version,
        )
    except ConfigError as exc:
        raise StoreError(
            f"{path} has invalid attrs for pkd-pairs version {version} (written by pkd {writer}): "
            f"{exc}. Install pkd {writer} to read it, or rebuild the store with this pkd "
            "(`pkd-prep scannet ... --overwrite`)."
        ) from exc


def write_root_attrs(root: zarr.Group, attrs: RootAttrs) -> None:
    """Replace the root attrs (validated by construction)."""
    root.attrs.put(attrs.to_dict())
    durable.committed(f"root attrs {attrs.status}")


def write_split_attrs(group: zarr.Group, attrs: SplitAttrs) -> None:
    """Replace a split's attrs; its arrays' shapes must match ``num_samples`` (fixed at creation)."""
    if array_of(group, "done_geometry").shape != (attrs.num_shards,):
        raise ValueError(f"split attrs for {attrs.num_samples} samples do not fit {group.path}")
    group.attrs.put(attrs.to_dict())
    durable.committed(f"{group.path} attrs")


def split_attrs(group: zarr.Group) -> SplitAttrs:
    """The typed attrs of one split of a current-version store (``open_store(mode="r+")`` upgrades one)."""
    return cast(SplitAttrs, SplitAttrs.from_dict(dict(group.attrs), f"{group.path} attrs"))


def int_attr(node: zarr.Group | zarr.Array[Any], key: str, default: int | None = None) -> int:
    """The integer attr ``key`` of a group or array (``default`` when absent); StoreError if it is not one."""
    value = node.attrs.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreError(
            f"{node.store}/{node.path} attr {key!r} is {value!r}, not an integer; the store is damaged: rebuild it."
        )
    return value


def _layout(group: zarr.Group) -> tuple[int, int]:
    """(num_samples, shard_size) of a split: the two attrs every version has, for readers of any version."""
    return int_attr(group, "num_samples"), int_attr(group, "shard_size")


def upgrade(path: str | Path) -> int:
    """Rewrite an older store's attrs at the current version (arrays are unchanged); returns the old version."""
    root = _open_group(path, "r+")
    attrs = read_attrs(root, path)
    if attrs.read_version != VERSION:
        groups = _split_groups(root)
        for name, split in attrs.splits.items():
            write_split_attrs(groups[name], split)
        write_root_attrs(root, attrs.root)
    return attrs.read_version


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array: its name, the shape of one sample, dtype and which stage writes it."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str
    stage: str


# The optional arrays of a split and the prep option that writes them: the fix a "no such array" error names.
OPTIONAL_ARRAYS = {"patch_tokens": "prep with --patch-tokens"}


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


def array_of(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array ``name`` of a split (a StoreError if the store holds something else there)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store}/{group.path}/{name} is not an array; the store is damaged: rebuild it.")
    return node


def split_group(root: zarr.Group, name: str) -> zarr.Group:
    """The group ``name`` of a store (a split, or ``stats`` of a split), typed for callers."""
    node = root[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{root.store}/{name} is not a group; the store is damaged: rebuild it.")
    return node


def _compressors() -> tuple[BloscCodec, Crc32cCodec]:
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())


def create_split(
    root: zarr.Group, split: str, attrs: SplitAttrs, num_points: int, patch_tokens: bool = False
) -> zarr.Group:
    """Create an empty split group sized for ``attrs.num_samples`` planned samples (may be 0)."""
    group = root.create_group(split)
    n, shard_size = attrs.num_samples, attrs.shard_size
    for spec in array_specs(num_points, patch_tokens):
        _create_sample_array(group, spec, n, shard_size)
    for stage in STAGES:
        group.create_array(f"done_{stage}", shape=(attrs.num_shards,), chunks=(1,), dtype="uint8", fill_value=0)
    reasons = len(attrs.skip_reasons)
    group.create_array(
        "skipped_counts", shape=(attrs.num_shards, reasons), chunks=(1, reasons), dtype="int32", fill_value=0
    )
    write_split_attrs(group, attrs)
    return group


def _create_sample_array(group: zarr.Group, spec: ArraySpec, n: int, shard_size: int) -> zarr.Array[Any]:
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


def add_array(group: zarr.Group, spec: ArraySpec) -> zarr.Array[Any]:
    """Add an optional per-sample array (e.g. patch_tokens) to an existing split."""
    return _create_sample_array(group, spec, *_layout(group))


DEFAULT_MEANINGS = {
    "prefix": "ClipCap prefix: clip_project(encode_image) viewed as (10, 768)",
    "clip_embed": "CLIP encode_image, unnormalised",
    "patch_tokens": "CLIP patch tokens after ln_post then proj, 7x7 grid",
}


def target_path(name: str, array: str) -> str:
    """Where ``array`` of target set ``name`` lies in a split group: the default set's at its top level, an added
    set's under ``targets/<name>/`` (pure: it opens nothing, so a config can name its target before a store)."""
    return array if name == DEFAULT_SET else f"{SETS_GROUP}/{name}/{array}"


@dataclass(frozen=True)
class TargetSet:
    """One named set of teacher targets as a trainer sees it: its teacher, transform and arrays, the default set
    (``DEFAULT_SET``: prep's ClipCap arrays) and the added ones alike."""

    name: str
    teacher: Mapping[str, Any]
    transform: TransformAttrs
    arrays: Mapping[str, TargetArrayAttrs]
    complete: bool

    def path(self, array: str) -> str:
        """Where ``array`` of this set lies in a split group: ConfigError naming the set's arrays for one it lacks,
        StoreError naming the prep option for an optional array (``OPTIONAL_ARRAYS``) a prep did not write."""
        if array not in self.arrays:
            if self.name == DEFAULT_SET and array in OPTIONAL_ARRAYS:
                raise StoreError(
                    f"target set {self.name!r} has no array {array!r}: the prep cached none ({OPTIONAL_ARRAYS[array]})."
                )
            raise ConfigError(
                f"target set {self.name!r} has no array {array!r}; it holds {', '.join(self.arrays)} "
                f"(pass --targets {self.name}/{next(iter(self.arrays))})."
            )
        return target_path(self.name, array)

    def done_shards(self, group: zarr.Group) -> np.ndarray:
        """Boolean per shard of a split: has this set been written there? (none for a split it was never added to)"""
        if self.name == DEFAULT_SET:
            return done_shards(group, "teacher")
        if f"{SETS_GROUP}/{self.name}" not in group:
            return np.zeros(len(shard_ranges(*_layout(group))), bool)
        return set_done_shards(group, self.name)

    def bytes_per_sample(self) -> int:
        """Stored bytes of one sample's arrays, uncompressed."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays.values())


def target_sets(root: zarr.Group) -> dict[str, TargetSet]:
    """Every target set of a store by name, the default one first; ``patch_tokens`` belongs to the default set
    where the splits hold it."""
    attrs = root_attrs(root)
    splits = [split_group(root, name) for name in splits_of(root)]
    tokens = bool(splits) and all("patch_tokens" in group for group in splits)
    default = {
        spec.name: TargetArrayAttrs(shape=spec.sample_shape, dtype=spec.dtype, meaning=DEFAULT_MEANINGS[spec.name])
        for spec in array_specs(attrs.num_points, tokens)
        if spec.stage == "teacher"
    }
    sets = {DEFAULT_SET: TargetSet(DEFAULT_SET, attrs.teacher.to_dict(), attrs.teacher.transform, default, True)}
    for name, added in attrs.targets.items():
        sets[name] = TargetSet(name, added.teacher, added.transform, added.arrays, added.status == "complete")
    return sets


def target_set(root: zarr.Group, name: str, path: str | Path) -> TargetSet:
    """The target set ``name`` of the store at ``path``; StoreError naming the sets it holds otherwise."""
    sets = target_sets(root)
    if name not in sets:
        raise StoreError(
            f"{path} has no target set {name!r}; it holds {', '.join(sets)}. Add one with "
            f"`pkd-prep teacher {path} --teacher KIND --name {name}`, or list them with `pkd-prep info {path}`."
        )
    return sets[name]


def parse_target(spec: str) -> tuple[str, str]:
    """(set, array) of a ``SET/ARRAY`` name as ``--targets`` takes it; ConfigError for another spelling."""
    name, sep, array = spec.partition("/")
    if not sep or not name or not array or "/" in array:
        raise ConfigError(
            f"--targets {spec!r} is not SET/ARRAY (e.g. {DEFAULT_SET}/prefix); `pkd-prep info STORE` lists the sets."
        )
    return name, array


def create_target_set(group: zarr.Group, name: str, arrays: Mapping[str, TargetArrayAttrs]) -> zarr.Group:
    """Create (empty, not done) the group of an added target set in a split; an existing one is replaced."""
    num_samples, shard_size = _layout(group)
    place = group.require_group(SETS_GROUP).create_group(name, overwrite=True)
    for array, attrs in arrays.items():
        _create_sample_array(place, ArraySpec(array, attrs.shape, attrs.dtype, name), num_samples, shard_size)
    place.create_array("done", shape=(len(shard_ranges(num_samples, shard_size)),), chunks=(1,), dtype="uint8")
    durable.committed(f"{group.path} target set {name} created")
    return place


def set_group(group: zarr.Group, name: str) -> zarr.Group:
    """The group of the added target set ``name`` in a split."""
    return split_group(group, f"{SETS_GROUP}/{name}")


def write_set_shard(group: zarr.Group, name: str, shard: int, data: Mapping[str, np.ndarray]) -> None:
    """Write one whole shard of every array of an added target set, then its done flag (as ``write_shard``)."""
    place = set_group(group, name)
    start, stop = shard_ranges(*_layout(group))[shard]
    for array, values in data.items():
        with zarr.config.set({"array.write_empty_chunks": True}):
            target = array_of(place, array)
        if values.shape != (stop - start, *target.shape[1:]):
            raise ValueError(f"shard {shard} of {name}/{array}: got {values.shape}, expected {target.shape[1:]}")
        target[start:stop] = values
    array_of(place, "done")[shard] = 1
    durable.committed(f"{group.path} target set {name} shard {shard} done")


def set_done_shards(group: zarr.Group, name: str) -> np.ndarray:
    """Boolean per shard: has the added target set ``name`` been written there?"""
    return np.asarray(array_of(set_group(group, name), "done")[:]).astype(bool)


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
    attrs = split_attrs(group)
    start, stop = shard_ranges(attrs.num_samples, attrs.shard_size)[shard]
    for name, values in data.items():
        with zarr.config.set({"array.write_empty_chunks": True}):  # a file per shard: see missing_shards
            array = array_of(group, name)
        if values.shape != (stop - start, *array.shape[1:]):
            raise ValueError(
                f"shard {shard} of {name!r}: got shape {values.shape}, expected {(stop - start, *array.shape[1:])}"
            )
        array[start:stop] = values
    if skipped is not None:
        array_of(group, "skipped_counts")[shard] = np.array([skipped.get(r, 0) for r in attrs.skip_reasons], "int32")
    array_of(group, f"done_{stage}")[shard] = 1
    durable.committed(f"{group.path} shard {shard} done_{stage}")


def done_shards(group: zarr.Group, stage: str) -> np.ndarray:
    """Boolean per shard: has this stage been written completely?"""
    return np.asarray(array_of(group, f"done_{stage}")[:]).astype(bool)


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
    arrays = [(name, array, done[stages[name]]) for name, array in group.arrays() if name in stages]
    if SETS_GROUP in group:
        for name, place in split_group(group, SETS_GROUP).groups():
            flags = set_done_shards(group, name)
            arrays += [(f"{SETS_GROUP}/{name}/{a}", array, flags) for a, array in place.arrays() if a != "done"]
    missing = []
    for name, array, flags in arrays:
        for shard in np.flatnonzero(flags):
            key = array.metadata.encode_chunk_key((int(shard),) + (0,) * (array.ndim - 1))
            if f"{group.path}/{name}/{key}" not in keys:
                missing.append((name, int(shard)))
    return missing


def reset_stage(group: zarr.Group, stage: str) -> None:
    """Mark every shard of a stage as not done, e.g. before recomputing targets with another teacher."""
    array_of(group, f"done_{stage}")[:] = 0


def _open_group(path: str | Path, mode: Literal["r", "r+"]) -> zarr.Group:
    if not is_remote(path) and not Path(path).exists():
        raise StoreError(
            f"no pair store at {path}: create one with `pkd-prep scannet --root SCANNET --out {path}` "
            "(a synthetic scene to try it on: `pkd-prep demo-scene --out DIR`)."
        )
    try:
        root = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise StoreError(f"{path} is not a Zarr v3 group ({exc}); pass a store written by pkd-prep.") from exc
    if not is_remote(path):
        _check_metadata(Path(path))
    return root


def _check_metadata(path: Path) -> None:
    """StoreError naming the first metadata file (group or array ``zarr.json``: attrs, shapes, codecs) under
    ``path`` that is not valid JSON: zarr would fail on it later with an error that names no file."""
    for meta in sorted(path.rglob("zarr.json")):
        try:
            json.loads(meta.read_bytes())
        except ValueError as exc:
            raise StoreError(
                f"{meta} is damaged ({exc}): the store's metadata cannot be read. Rebuild the store (rerun "
                "the prep with --overwrite) or restore it from a copy."
            ) from exc


def drop_partial_writes(path: str | Path) -> int:
    """Delete the temp files (``zarr.<hex>.partial``) zarr's local store leaves when a write is killed before its
    rename; returns how many. Call it only with the store's lock held, before any writer starts: an
    in-flight write of another process has such a file too."""
    if is_remote(path):
        return 0
    stale = list(Path(path).rglob("zarr.*.partial"))
    for file in stale:
        file.unlink(missing_ok=True)
    return len(stale)


def open_store(path: str | Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """Open an existing pair store after checking its attrs; opened for writing, an older version's attrs
    are upgraded in place first (the arrays of every version so far are the same)."""
    if mode != "r":
        upgrade(path)
    root = _open_group(path, mode)
    read_attrs(root, path)
    return root


def root_attrs(root: zarr.Group) -> RootAttrs:
    """The typed root attrs of a store opened by ``open_store`` (upgraded in memory if older)."""
    return read_attrs(root, str(root.store)).root


def teacher_crop(path: str | Path, split: str, target: str = DEFAULT_SET) -> tuple[float, float, float, float]:
    """The centre crop (u0, v0, u1, v1) the teacher of target set ``target`` saw, in the colour-image pixels of a
    split, from the store: its one colour frame size and the set's transform's image size."""
    root = _open_group(path, "r")
    attrs = read_attrs(root, path)
    transform = target_set(root, target, path).transform
    sizes = set(attrs.splits[split].color_sizes) if split in attrs.splits else set()
    if len(sizes) != 1:
        raise StoreError(
            f"{path}/{split} records {'no' if not sizes else 'several'} colour image sizes (color_sizes "
            f"attr: {sorted(sizes)}); the teacher's crop of the pixels needs exactly one. Prep scenes of "
            "one camera into a store, or re-run pkd-prep with this pkd to record them."
        )
    ((width, height),) = sizes
    return geometry.teacher_crop_box(width, height, transform.image_size, transform.center_crop)


def splits_of(root: zarr.Group) -> list[str]:
    """Names of the splits present in a store, in canonical order."""
    present = {name for name, _ in root.groups()}
    return [s for s in SPLITS if s in present]


def open_split(path: str | Path, split: str, require: tuple[str, ...] = ()) -> zarr.Group:
    """Open one complete split for reading; ``require`` names arrays a consumer needs."""
    root = open_store(path)
    if split not in splits_of(root):
        held = (
            ", ".join(f"{name} ({_layout(split_group(root, name))[0]} samples)" for name in splits_of(root)) or "none"
        )
        example = (splits_of(root) or ["test"])[0]
        raise StoreError(
            f"{path} has no split {split!r}; it holds {held}. Pass --split with one of those (e.g. "
            f"--split {example}), or prep a store from scenes of split {split!r}: pkd-prep assigns "
            "splits from the official ScanNet v2 lists (scans_test/ scenes are test)."
        )
    group = split_group(root, split)
    for stage in STAGES:
        done = done_shards(group, stage)
        if not done.all():
            raise StoreError(
                f"{path}/{split}: {int((~done).sum())} of {done.size} shards lack their {stage} "
                "arrays; rerun the same pkd-prep command to finish them."
            )
    present = {name for name, _ in group.arrays()}
    for name in require:
        if name.startswith(f"{SETS_GROUP}/"):
            _require_set(path, split, group, name.split("/")[1])
        elif name not in present:
            hint = f" ({OPTIONAL_ARRAYS[name]})" if name in OPTIONAL_ARRAYS else ""
            raise StoreError(f"{path}/{split} has no array {name!r}{hint}.")
    missing = missing_shards(group)
    if missing:
        raise StoreError(
            f"{path}/{split}: {len(missing)} shard file(s) are missing, e.g. {missing[0][0]} shard "
            f"{missing[0][1]}; they would read back as zeros. Run `pkd-prep verify {path}` and rebuild "
            "the store (rerun the prep with --overwrite, or restore it from a copy)."
        )
    return group


def _require_set(path: str | Path, split: str, group: zarr.Group, name: str) -> None:
    """StoreError unless the split holds every shard of the added target set ``name``."""
    if f"{SETS_GROUP}/{name}" not in group:
        raise StoreError(
            f"{path}/{split} has no target set {name!r}: run `pkd-prep teacher {path} --name {name} ...` "
            "(it computes the set for every split)."
        )
    done = set_done_shards(group, name)
    if not done.all():
        raise StoreError(
            f"{path}/{split}: {int((~done).sum())} of {done.size} shards lack target set {name!r}; rerun "
            f"the same `pkd-prep teacher {path} --name {name}` command to finish them."
        )


def read_shard(group: zarr.Group, name: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of one array; a chunk failing its checksum or codec raises a StoreError
    naming the array, shard and sample range, so nothing downstream learns from corrupt bytes."""
    array = array_of(group, name)
    try:
        return np.asarray(array[start:stop])
    except Exception as exc:  # codecs raise many types (ValueError, RuntimeError, blosc errors)
        raise _corrupt(array, start, stop, exc) from exc


def read_rows(
    array: zarr.Array[Any], start: int, stop: int, rows: np.ndarray, out: np.ndarray, dest: np.ndarray
) -> None:
    """Decode samples ``start + rows[i]`` of the shard [start, stop) of ``array`` into ``out[dest[i]]``.

    The loader's fast path. zarr decodes a shard through its async pipeline one inner chunk at a time, at
    several times the cost of the decompression itself; here the shard is read from the store once, its
    index (sharding spec, at the end, CRC32C-checked) is parsed, and each wanted inner chunk is checked
    against its CRC32C and Blosc-decoded straight into its place in ``out``. It applies to arrays laid out
    as ``_create_sample_array`` writes them; any other layout is read through zarr. A missing shard or
    chunk, a failed checksum or a chunk of the wrong size raises the StoreError of ``read_shard``, never zeros.
    """
    shard_size = _fast_shard_size(array)
    try:
        if shard_size is None or start % shard_size:
            out[dest] = np.asarray(array[start:stop])[rows]
        else:
            _decode_rows(array, start // shard_size, shard_size, rows, out, dest)
    except Exception as exc:  # codecs raise many types (ValueError, RuntimeError, blosc errors)
        raise _corrupt(array, start, stop, exc) from exc


def _corrupt(array: zarr.Array[Any], start: int, stop: int, exc: Exception) -> StoreError:
    shard = start // int(array.shards[0] if array.shards else array.chunks[0])
    return StoreError(
        f"{array.store_path}: shard {shard} (samples {start}-{stop - 1}) is corrupt ({type(exc).__name__}: "
        f"{exc}). Run `pkd-prep verify` on the store and rebuild it (rerun the prep with --overwrite, or "
        "restore it from a copy)."
    )


def _fast_shard_size(array: zarr.Array[Any]) -> int | None:
    """Samples per shard if ``array`` is sharded one sample per Blosc+CRC32C inner chunk, else None."""
    codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    little = BytesCodec(endian="little")
    inner = [type(c) for c in sharding.codecs]
    if (
        sharding.index_location != ShardingCodecIndexLocation.end
        or tuple(sharding.index_codecs) != (little, Crc32cCodec())
        or inner != [BytesCodec, BloscCodec, Crc32cCodec]
        or sharding.codecs[0] != little
        or tuple(sharding.chunk_shape) != (1, *array.shape[1:])
        or array.dtype.byteorder == ">"
    ):
        return None
    return int(array.shards[0]) if array.shards else None


def _checked(data: np.ndarray, what: str) -> np.ndarray:
    """``data`` less its trailing CRC32C, which must match."""
    body, stored = data[:-4], int.from_bytes(data[-4:].tobytes(), "little")
    if len(data) < 4 or crc32c.crc32c(body.data) != stored:
        raise ValueError(f"{what} fails its CRC32C checksum")
    return body


def _decode_rows(
    array: zarr.Array[Any], shard: int, shard_size: int, rows: np.ndarray, out: np.ndarray, dest: np.ndarray
) -> None:
    key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
    buffer = sync(array.store_path.store.get(f"{array.path}/{key}", prototype=default_buffer_prototype()))
    if buffer is None:
        raise ValueError("the shard file is missing")
    data = buffer.as_numpy_array().view(np.uint8).reshape(-1)
    index_bytes = 16 * shard_size + 4
    if len(data) < index_bytes:
        raise ValueError("the shard is shorter than its index")
    index = _checked(data[-index_bytes:], "the shard index").view("<u8").reshape(shard_size, 2)
    for row, place in zip(rows.tolist(), dest.tolist()):
        offset, nbytes = (int(v) for v in index[row])
        if offset == 2**64 - 1 or offset + nbytes > len(data) - index_bytes:
            raise ValueError(f"sample {row} of the shard is missing")
        chunk = _checked(data[offset : offset + nbytes], f"sample {row}")
        target = out[place : place + 1].reshape(-1).view(np.uint8)
        if len(chunk) < 16 or int.from_bytes(chunk[4:8].tobytes(), "little") != target.nbytes:
            raise ValueError(f"sample {row} does not decode to one sample")
        blosc.decompress(chunk, target)


def _stats_place(group: zarr.Group, path: str) -> tuple[str, str]:
    """(stats group path, array name prefix) of a target array's statistics: ``stats`` beside the array."""
    parent, _, name = path.rpartition("/")
    return (f"{parent}/stats" if parent else "stats"), name


def write_stats(group: zarr.Group, path: str, mean: np.ndarray, std: np.ndarray) -> None:
    """Store per-dimension mean/std of a target array (``path`` in the split; shape of one sample)."""
    where, name = _stats_place(group, path)
    stats = group.require_group(where)
    for kind, values in (("mean", mean), ("std", std)):
        stats.create_array(f"{name}_{kind}", data=np.asarray(values, dtype="float32"), overwrite=True)
    durable.committed(f"{group.path} stats {path}")


def target_moments(group: zarr.Group, path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-dimension (mean, std), in float64, of target array ``path`` over the split's valid samples, read shard by
    shard: what prep records with ``write_stats`` and what training computes where none is recorded. None when
    the split has no valid sample."""
    shape = array_of(group, path).shape[1:]
    total, total_sq, count = np.zeros(shape), np.zeros(shape), 0
    for _, start, stop in iter_shards(group):
        valid = read_shard(group, "valid", start, stop).astype(bool)
        values = read_shard(group, path, start, stop)[valid].astype(np.float64)
        total, total_sq, count = total + values.sum(0), total_sq + (values**2).sum(0), count + len(values)
    if count == 0:
        return None
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))


def read_stats(group: zarr.Group, path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-dimension (mean, std) of a target array, or None if the split has none recorded."""
    where, name = _stats_place(group, path)
    if where not in group or f"{name}_mean" not in split_group(group, where):
        return None
    stats = split_group(group, where)
    return np.asarray(array_of(stats, f"{name}_mean")[...]), np.asarray(array_of(stats, f"{name}_std")[...])


def iter_shards(group: zarr.Group) -> Iterator[tuple[int, int, int]]:
    """(shard index, start, stop) of every shard of a split."""
    for i, (start, stop) in enumerate(shard_ranges(*_layout(group))):
        yield i, start, stop
