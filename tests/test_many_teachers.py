"""One store, many teachers, end to end through the installed scripts: prep the demo, add an open_clip set and a
DINOv2 set with seeded weights, ablate across them in one table; the geometry and the first set stay byte for
byte, the export names the teacher of its set, and a store of the version before target sets still trains."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import zarr
from test_target_sets import tree_digest

from pkd.common import store

from _cli import DEMO_TRAIN, flags, run_script

SETS = {
    "oc": ("open_clip:ViT-S-32", "embed", (384,)),
    "dino": ("dinov2:small", "cls", (384,)),
}


def ok(*args, **kw):
    done = run_script(*args, timeout=None, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_one_table_across_teachers_from_one_store(demo_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "pairs.zarr"
    shutil.copytree(demo_store, path)
    before = tree_digest(path)
    for name, (kind, _, _) in SETS.items():
        ok("pkd-prep", "teacher", path, "--teacher", kind, "--random-weights", "--name", name, "--no-progress")
    assert tree_digest(path) == before
    sets = store.target_sets(store.open_store(path))
    assert {name: sets[name].arrays[array].shape for name, (_, array, _) in SETS.items()} == {
        name: shape for name, (_, _, shape) in SETS.items()
    }

    targets = ",".join(f"{name}/{array}" for name, (_, array, _) in SETS.items())
    train = flags(**DEMO_TRAIN, max_steps=2, eval="none", name="teachers")
    ok("pkd-train", "ablate", path, "--variants", "distill,recon", "--targets", targets, *train, cwd=tmp_path)
    table = tmp_path / "runs" / "ablate-teachers"
    rows = json.loads((table / "table.json").read_text())["rows"]
    assert [(r["variant"], r.get("targets")) for r in rows] == [
        ("distill", "oc/embed"),
        ("distill", "dino/cls"),
        ("recon", None),
    ]
    assert all(r["status"] == "done" and r["steps"] == 2 and r["train_loss"] > 0 for r in rows)
    assert "| distill | oc/embed |" in (table / "table.md").read_text()
    for row, (name, (kind, _, shape)) in zip(rows, SETS.items()):
        recorded = json.loads((tmp_path / row["run_dir"] / "config.json").read_text())
        assert recorded["store"]["teacher"]["kind"] == kind and recorded["store"]["targets"] == row["targets"]
        assert recorded["config"]["model"]["target_shape"] == list(shape)
        encoder = tmp_path / f"{name}.pth"
        ok("pkd-train", "export", tmp_path / row["run_dir"], "--out", encoder, cwd=tmp_path)
        provenance = torch.load(encoder, weights_only=True)["pkd"]
        assert provenance["teacher"]["kind"] == kind and provenance["teacher"]["random"] is True


@pytest.mark.slow
def test_a_store_of_the_version_before_target_sets_still_trains(demo_store, tmp_path):
    path = tmp_path / "v2.zarr"
    shutil.copytree(demo_store, path)
    root = zarr.open_group(str(path), mode="r+")
    attrs = {k: v for k, v in root.attrs.items() if k != "targets"}
    root.attrs.put({**attrs, "version": 2})
    run = tmp_path / "run"
    ok("pkd-train", "distill", path, "--run-dir", run, *flags(**DEMO_TRAIN, max_steps=2), cwd=tmp_path)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["store"]["targets"] == "clipcap/prefix" and recorded["config"]["model"]["target_shape"] == [10, 768]
    assert zarr.open_group(str(path), mode="r").attrs["version"] == 2  # training reads, never rewrites a store
