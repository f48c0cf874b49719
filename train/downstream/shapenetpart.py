"""ShapeNetPart (``shapenetcore_partanno_segmentation_benchmark_v0_normal``): 16 categories, 50 parts.

Metadata (in DATA, or in a separate ``--splits`` folder): ``synsetoffset2category.txt`` (``Name<TAB>synset``)
and ``train_test_split/shuffled_{train,val,test}_file_list.json`` (entries ``shape_data/<synset>/<id>``).

Shape files are ``x y z nx ny nz part`` lines (space separated; ``part`` a global id 0–49). The official
archive keeps them at ``DATA/<synset>/<id>.txt``; we find them anywhere below DATA as ``<synset>/<id>.txt``
or ``<synset>/<id>.<suffix>.txt``, which also covers copies split into sub-folders (the test fixture is
torch-points3d's processed ``{test,val}/<synset>/<id>.normalized_gridsampled.txt``).

As Point-MAE (PointNet++'s ``PartNormalDataset``): train on train+val, test on test, xyz normalised to
the unit sphere per shape, then ``num_points`` drawn with replacement each time a shape is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkd.common.errors import DataError
from pkd.train.downstream.files import normalize_unit_sphere, read_point_file, require_dir, require_file

CATEGORY_PARTS: dict[str, tuple[int, ...]] = {
    "Airplane": (0, 1, 2, 3),
    "Bag": (4, 5),
    "Cap": (6, 7),
    "Car": (8, 9, 10, 11),
    "Chair": (12, 13, 14, 15),
    "Earphone": (16, 17, 18),
    "Guitar": (19, 20, 21),
    "Knife": (22, 23),
    "Lamp": (24, 25, 26, 27),
    "Laptop": (28, 29),
    "Motorbike": (30, 31, 32, 33, 34, 35),
    "Mug": (36, 37),
    "Pistol": (38, 39, 40),
    "Rocket": (41, 42, 43),
    "Skateboard": (44, 45, 46),
    "Table": (47, 48, 49),
}
CATEGORIES = tuple(CATEGORY_PARTS)  # the one-hot order: synsetoffset2category.txt's (alphabetical) order
NUM_PARTS = 50
SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",), "trainval": ("train", "val")}


@dataclass(frozen=True)
class PartSet:
    """Shapes of one split: per-shape ``points`` (n_i, 3) on the unit sphere and ``parts`` (n_i,) global ids."""

    points: list[np.ndarray]
    parts: list[np.ndarray]
    categories: np.ndarray  # (N,) index into CATEGORIES
    names: list[str]  # "<synset>/<id>"
    missing: int = 0

    def sample(self, index: int, num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``num_points`` points of shape ``index`` drawn with replacement, and their part labels."""
        choice = rng.choice(len(self.parts[index]), num_points, replace=True)
        return self.points[index][choice], self.parts[index][choice]


def read_category_map(meta: Path) -> dict[str, str]:
    """synset → category name from ``synsetoffset2category.txt``; DataError for a category we do not know."""
    path = require_file(
        meta / "synsetoffset2category.txt",
        "the ShapeNetPart category map (Name<TAB>synset)",
        "Pass --splits pointing at the folder holding synsetoffset2category.txt and train_test_split/.",
    )
    mapping = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, synset = line.split()[:2]
        if name not in CATEGORY_PARTS:
            raise DataError(
                f"{path} names category {name!r}, which is not one of the 16 ShapeNetPart categories "
                f"({', '.join(CATEGORIES)}); use the official synsetoffset2category.txt."
            )
        mapping[synset] = name
    return mapping


def _split_entries(meta: Path, split: str) -> list[tuple[str, str]]:
    entries = []
    for part in SPLITS[split]:
        path = require_file(
            meta / "train_test_split" / f"shuffled_{part}_file_list.json",
            f"the {part} split list",
            "Pass --splits pointing at the folder that holds train_test_split/.",
        )
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); re-extract the dataset archive.") from exc
        for item in items:
            bits = str(item).split("/")
            if len(bits) != 3:
                raise DataError(f"{path} has entry {item!r}; expected 'shape_data/<synset>/<id>'.")
            entries.append((bits[1], bits[2]))
    return entries


def _index_shape_files(data: Path, synsets: set[str]) -> dict[tuple[str, str], Path]:
    """(synset, id) → file, for every ``<synset>/<id>[.<suffix>].txt`` below ``data``."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(data.rglob("*.txt")):
        if path.parent.name not in synsets:
            continue
        key = (path.parent.name, path.name.split(".", 1)[0])
        if key in found:
            raise DataError(
                f"shape {key[0]}/{key[1]} exists twice, as {found[key]} and {path}; keep one copy under --data."
            )
        found[key] = path
    return found


def load_shapenetpart(
    data: str | Path, split: str, *, splits: str | Path | None = None, allow_missing: bool = False
) -> PartSet:
    """One split (train, val, test or trainval) of ShapeNetPart, xyz normalised per shape."""
    if split not in SPLITS:
        raise DataError(f"unknown ShapeNetPart split {split!r}; use one of {', '.join(SPLITS)}.")
    data = require_dir(
        Path(data),
        "the shapenetcore_partanno_segmentation_benchmark_v0_normal folder",
        "Pass --data pointing at the extracted ShapeNetPart folder.",
    )
    meta = Path(splits) if splits else data
    synset_to_name = read_category_map(meta)
    files = _index_shape_files(data, set(synset_to_name))
    points, parts, categories, names, missing = [], [], [], [], 0
    for synset, shape in _split_entries(meta, split):
        if synset not in synset_to_name:
            raise DataError(
                f"the {split} split lists {synset}/{shape}, but synset {synset} is not in "
                f"{meta / 'synsetoffset2category.txt'}; use the official metadata files."
            )
        path = files.get((synset, shape))
        if path is None:
            if not allow_missing:
                raise DataError(
                    f"{data / synset / f'{shape}.txt'} (listed in the {split} split) is missing. "
                    "Re-extract the dataset, or pass --allow-missing to use only the shapes present."
                )
            missing += 1
            continue
        category = synset_to_name[synset]
        table = read_point_file(path, None, 4)
        labels = table[:, -1].astype(np.int64)
        wrong = sorted(set(labels.tolist()) - set(CATEGORY_PARTS[category]))
        if wrong:
            raise DataError(
                f"{path} is a {category} shape but has part labels {wrong[:5]}, outside {category}'s "
                f"parts {list(CATEGORY_PARTS[category])}; the file is damaged or misplaced."
            )
        points.append(normalize_unit_sphere(table[:, :3]))
        parts.append(labels)
        categories.append(CATEGORIES.index(category))
        names.append(f"{synset}/{shape}")
    if not points:
        raise DataError(
            f"none of the shapes in the {split} split exist under {data}; point --data at the "
            "extracted ShapeNetPart folder."
        )
    return PartSet(points, parts, np.asarray(categories, dtype=np.int64), names, missing)
