"""Find ScanNet scenes on disk and open them.

``root`` is a ScanNet tree (``scans/`` for train/val scenes, ``scans_test/`` for test scenes), a folder of
scene folders, or one scene folder. A scene folder ``sceneXXXX_YY/`` holds ``sceneXXXX_YY.sens`` and/or
the exported layout (color/, depth/, pose/, intrinsic/). Splits come from the official ScanNet v2 lists
in ``pkd.data_manifests``; a scene in none of them (the demo scene, a user's own scan) is "train".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from pkd.common.errors import DataError
from pkd.common.store import SPLITS
from pkd.preprocess.exported import DEPTH_SHIFT, ExportedReader
from pkd.preprocess.frames import SceneReader
from pkd.preprocess.sens import SensReader

SOURCES = ("auto", "sens", "exported")
TREE_FOLDERS = ("scans", "scans_test")
_LAYOUT = (
    "Expected a ScanNet tree (ROOT/scans/sceneXXXX_YY/ and/or ROOT/scans_test/sceneXXXX_YY/), a folder of "
    "scene folders, or one scene folder; each scene folder holds sceneXXXX_YY.sens and/or the exported "
    "layout color/N.jpg, depth/N.png, pose/N.txt, intrinsic/."
)


@dataclass(frozen=True)
class SceneEntry:
    """One scene to read: its name, split, what to open (a .sens file or an exported folder) and how."""

    name: str
    split: str
    path: Path
    kind: str
    depth_scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@cache
def split_lists() -> dict[str, frozenset[str]]:
    """The official ScanNet v2 scene lists, by split."""
    package = resources.files("pkd.data_manifests")
    return {split: frozenset(package.joinpath(f"scannetv2_{split}.txt").read_text().split()) for split in SPLITS}


def split_of(name: str) -> str:
    """Official split of a scene name; "train" for scenes in no list."""
    lists = split_lists()
    return next((split for split in SPLITS if name in lists[split]), "train")


def find_scenes(
    root: str | Path,
    split: str = "all",
    scenes: Sequence[str] | None = None,
    source: str = "auto",
    depth_scale: float | None = None,
) -> list[SceneEntry]:
    """Scenes under ``root`` in the given split (or all), optionally only those named, ordered by split
    (train, val, test) then name. ``source`` picks the .sens file or the exported layout ("auto" prefers
    .sens when a folder has both). ``depth_scale`` (depth units per metre) overrides the exported layout's
    millimetres; a .sens file records its own."""
    root = Path(root)
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; use one of {', '.join((*SPLITS, 'all'))}.")
    if source not in SOURCES:
        raise DataError(f"unknown scene source {source!r}; use one of {', '.join(SOURCES)}.")
    if not root.is_dir():
        raise DataError(
            f"ScanNet root {root} does not exist or is not a folder; pass the folder holding scans/ "
            "(or a scene folder), or create a demo scene with `pkd-prep demo-scene --out DIR`."
        )
    found: dict[str, SceneEntry] = {}
    for folder in _scene_folders(root):
        entry = _entry(folder, source, depth_scale)
        if entry is None:
            continue
        if entry.name in found:
            raise DataError(
                f"scene {entry.name} appears twice under {root} ({found[entry.name].path} and "
                f"{entry.path}); keep one copy."
            )
        found[entry.name] = entry
    if not found:
        kinds = {"auto": "", "sens": " with a .sens file", "exported": " in the exported layout"}[source]
        raise DataError(f"no ScanNet scenes{kinds} found under {root}. {_LAYOUT}")
    if scenes:
        unknown = [name for name in scenes if name not in found]
        if unknown:
            raise DataError(
                f"scenes not found under {root}: {', '.join(unknown)}; check --scenes against the "
                f"scene folders there ({len(found)} found)."
            )
        elsewhere = [f"{name} ({found[name].split})" for name in scenes if split not in ("all", found[name].split)]
        if elsewhere:
            raise DataError(f"scenes not in split {split!r}: {', '.join(elsewhere)}; use --split all or drop them.")
        chosen = [found[name] for name in dict.fromkeys(scenes)]
    else:
        chosen = [e for e in found.values() if split in ("all", e.split)]
    if not chosen:
        raise DataError(
            f"no scene under {root} is in split {split!r}; the scenes there fall in "
            f"{describe_splits(found.values())}. Splits follow the official ScanNet v2 lists "
            "(scans_test/ scenes are test; scenes in no list count as train); pass --split all or one "
            "of the splits found."
        )
    sens = next((e for e in chosen if e.kind == "sens"), None)
    if depth_scale is not None and sens is not None:
        raise DataError(
            f"--depth-scale applies to exported frames, but {sens.path} is a .sens file, which records "
            "its own depth scale; pass --source exported or drop --depth-scale."
        )
    return sorted(chosen, key=lambda e: (SPLITS.index(e.split), e.name))


def describe_splits(entries: Iterable[SceneEntry]) -> str:
    """Which splits scenes fall in, e.g. "train: 2 scenes (scene0000_00, scene0001_00); test: 1 scene (...)"."""
    by_split: dict[str, list[str]] = {}
    for entry in entries:
        by_split.setdefault(entry.split, []).append(entry.name)
    return "; ".join(
        f"{split}: {len(names)} scene{'s' * (len(names) != 1)} ({', '.join(sorted(names)[:3])}"
        f"{', ...' * (len(names) > 3)})"
        for split, names in sorted(by_split.items(), key=lambda item: SPLITS.index(item[0]))
    )


def open_scene(entry: SceneEntry) -> SceneReader:
    """A reader for a discovered scene."""
    if entry.kind == "sens":
        return SensReader(entry.path, name=entry.name)
    if entry.kind == "exported":
        return ExportedReader(entry.path, name=entry.name, depth_scale=entry.depth_scale or DEPTH_SHIFT)
    raise DataError(f"scene {entry.name}: unknown kind {entry.kind!r} (expected 'sens' or 'exported').")


def _scene_folders(root: Path) -> list[Path]:
    """The scene folders of a tree, of a folder of scenes, or the root itself when it is a scene."""
    if _is_scene(root):
        return [root]
    trees = [root / t for t in TREE_FOLDERS if (root / t).is_dir()] or [root]
    return [folder for tree in trees for folder in sorted(tree.iterdir()) if folder.is_dir() and _is_scene(folder)]


def _is_scene(folder: Path) -> bool:
    return _sens_file(folder) is not None or _is_exported(folder)


def _sens_file(folder: Path) -> Path | None:
    """``<name>.sens``, else the folder's only .sens file."""
    named = folder / f"{folder.name}.sens"
    if named.is_file():
        return named
    candidates = [p for p in folder.glob("*.sens") if p.is_file()]
    return candidates[0] if len(candidates) == 1 else None


def _is_exported(folder: Path) -> bool:
    return all((folder / part).is_dir() for part in ("color", "depth", "pose"))


def _entry(folder: Path, source: str, depth_scale: float | None) -> SceneEntry | None:
    name, sens = folder.name, _sens_file(folder)
    if sens is not None and source in ("auto", "sens"):
        return SceneEntry(name, split_of(name), sens, "sens", depth_scale)
    if _is_exported(folder) and source in ("auto", "exported"):
        return SceneEntry(name, split_of(name), folder, "exported", depth_scale)
    return None
