"""ScanNet semantic segmentation on the demo room's labelled mesh: PLY layout and errors, the Zarr mesh cache,
metrics against hand-computed IoUs, full vertex coverage, and finetune/test end to end (tiny encoder)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pkd.common import seg_cache
from pkd.common.errors import ConfigError, DataError, StoreError
from pkd.common.scannet_mesh import IGNORE, class_names, map_labels, read_scene, scene_files
from pkd.preprocess.demo import BOXES, ROOM, SPHERE
from pkd.preprocess.demo_mesh import write_demo_mesh, write_demo_splits
from pkd.train.cli import app
from pkd.train.downstream import metrics
from pkd.train.downstream.config import FinetuneConfig
from pkd.train.downstream.models import FeaturePropagation, concat_features, interpolate_features
from pkd.train.downstream.plots import class_iou_figure
from pkd.train.downstream.scannet_seg import SceneSegmenter, coverage_passes
from pkd.train.encoder import EncoderConfig

from _cli import flags, run_command, run_script

SCENE = "scene9000_00"
TINY = flags(num_points=256, num_group=16, dim=32, depth=3, heads=2, crop_size=4.0, device="cpu")


def demo_tree(root: Path, spacing: float = 0.25) -> Path:
    """A ScanNet tree with the demo room's two PLYs (coarse, for speed) and split lists naming it."""
    scene = root / "scans" / SCENE
    scene.mkdir(parents=True)
    write_demo_mesh(scene, ROOM, BOXES, SPHERE, seed=0, spacing=spacing)
    write_demo_splits(root, SCENE)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return demo_tree(tmp_path / "scannet")


# ---- PLY files --------------------------------------------------------------------------------------------


def test_demo_mesh_has_scannets_binary_layout_and_labels(tree):
    mesh, labels = scene_files(tree / "scans" / SCENE)
    header = labels.read_bytes().split(b"end_header")[0].decode()
    assert "format binary_little_endian 1.0" in header
    assert [line.split()[-1] for line in header.splitlines() if line.startswith("property")] == [
        "x",
        "y",
        "z",
        "red",
        "green",
        "blue",
        "alpha",
        "label",
        "vertex_indices",
    ]
    assert "property ushort label" in header and "property list uchar int vertex_indices" in header
    assert "property ushort label" not in mesh.read_bytes().split(b"end_header")[0].decode()
    scene = read_scene(mesh, labels)
    names = class_names()
    present = {names[c] for c in np.unique(scene.label) if c != IGNORE}
    assert present == {"wall", "floor", "cabinet", "bed", "table"}
    assert (scene.label == IGNORE).sum() > 0  # ceiling (22) and ball (40) are outside the 20 classes
    assert scene.xyz.min() >= -1e-6 and np.allclose(scene.xyz.max(axis=0), ROOM[1])


def test_label_mapping_follows_the_benchmark_ids():
    np.testing.assert_array_equal(
        map_labels(np.array([0, 1, 2, 13, 14, 22, 36, 39, 40, 41, 65535])),
        [IGNORE, 0, 1, IGNORE, 12, IGNORE, 18, 19, IGNORE, IGNORE, IGNORE],
    )
    assert len(class_names()) == 20 and class_names()[:3] == ("wall", "floor", "cabinet")


def _broken_trees(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Trees whose scene has one fault each: (tree, the file the error must name)."""
    trees = {}
    for fault in ("no_label", "counts", "truncated"):
        root = demo_tree(tmp_path / fault)
        mesh, labels = scene_files(root / "scans" / SCENE)
        if fault == "no_label":
            shutil.copy(mesh, labels)
        elif fault == "counts":
            finer = demo_tree(tmp_path / "finer", spacing=0.2)
            shutil.copy(scene_files(finer / "scans" / SCENE)[1], labels)
        else:
            mesh.write_bytes(mesh.read_bytes()[:-5000])
        trees[fault] = (root, labels.name if fault != "truncated" else mesh.name)
    return trees


def test_broken_plys_give_errors_naming_the_file(tmp_path):
    trees = _broken_trees(tmp_path)
    expect = {"no_label": "no vertex property label", "counts": "vertices but", "truncated": "truncated or damaged"}
    for fault, (root, name) in trees.items():
        with pytest.raises(DataError, match=expect[fault]) as err:
            read_scene(*scene_files(root / "scans" / SCENE))
        assert name in str(err.value)
    root, name = trees["no_label"]
    done = run_script(
        "pkd-prep",
        "scannet-seg",
        *flags(root=root, out=tmp_path / "seg.zarr", splits=root / "splits", split="train"),
        timeout=120,
    )
    assert done.returncode == 2 and name in done.stderr and "Traceback" not in done.stderr, done.stderr
    root, name = trees["truncated"]
    done = run_script(
        "pkd-train",
        "finetune",
        "scannet-seg",
        *flags(
            data=root, splits=root / "splits", init="scratch", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run"
        ),
        *TINY,
        timeout=120,
    )
    assert done.returncode == 2 and name in done.stderr and "Traceback" not in done.stderr, done.stderr


# ---- cache ------------------------------------------------------------------------------------------------


def test_cache_resumes_verifies_and_refuses_corruption(tree, tmp_path):
    path = tmp_path / "seg.zarr"
    with pytest.raises(DataError, match="scene0000_00.*--allow-missing"):
        seg_cache.build_cache(tree, path, [SCENE, "scene0000_00"], progress=False)
    summary = seg_cache.build_cache(tree, path, [SCENE, "scene0000_00"], allow_missing=True, progress=False)
    assert summary == {"written": 1, "kept": 0, "missing": ["scene0000_00"]}  # the refusal came before any parsing
    assert seg_cache.build_cache(tree, path, [SCENE], progress=False) == {"written": 0, "kept": 1, "missing": []}
    root = seg_cache.open_cache(path)
    cached, parsed = seg_cache.load_scene(root, SCENE), read_scene(*scene_files(tree / "scans" / SCENE))
    for a, b in zip((cached.xyz, cached.rgb, cached.label), (parsed.xyz, parsed.rgb, parsed.label)):
        np.testing.assert_array_equal(a, b)
    assert seg_cache.verify_cache(path) == []
    done = run_script("pkd-prep", "verify", path, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr

    seg_cache.open_cache(path, mode="a")[SCENE].attrs["done"] = False  # as if killed mid-write
    assert seg_cache.verify_cache(path) == [f"{SCENE}: unfinished (rerun the command that builds the cache)"]
    assert seg_cache.build_cache(tree, path, [SCENE], progress=False)["written"] == 1
    chunk = next(p for p in (path / SCENE / "xyz").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert any("unreadable" in f for f in seg_cache.verify_cache(path))
    with pytest.raises(StoreError, match=f"{SCENE} is corrupt"):
        seg_cache.load_scene(seg_cache.open_cache(path), SCENE)
    done = run_script("pkd-prep", "verify", path, timeout=120)
    assert f"FAULT {SCENE}: unreadable" in done.stderr  # (its exit status is issue 12's: typer.Exit reads as 0)
    with pytest.raises(StoreError, match="not a Zarr group"):
        seg_cache.build_cache(tree, tree, [SCENE], progress=False)  # never writes into a folder of other files
    import zarr

    zarr.open_group(str(tmp_path / "pairs.zarr"), mode="w").attrs["format"] = "pkd-pairs"
    with pytest.raises(StoreError, match="not a pkd-scannet-seg"):
        seg_cache.open_cache(tmp_path / "pairs.zarr", mode="a")


def test_cache_rebuilds_changed_plys_and_another_roots_cache(tree, tmp_path, caplog):
    path = tmp_path / "seg.zarr"
    seg_cache.build_cache(tree, path, [SCENE], progress=False)
    attrs = seg_cache.cache_attrs(seg_cache.open_cache(path))
    assert attrs.data_root == str(tree.resolve()) and attrs.classes == class_names()
    mesh, labels = scene_files(tree / "scans" / SCENE)
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="pkd.common.seg_cache"):
        assert seg_cache.build_cache(tree, path, [SCENE], progress=False)["written"] == 1
        assert seg_cache.build_cache(tree, path, [SCENE], progress=False) == {"written": 0, "kept": 1, "missing": []}
    assert [r.getMessage() for r in caplog.records] == [f"{SCENE}: mesh files changed since cached; re-reading"]

    caplog.clear()
    other = demo_tree(tmp_path / "other", spacing=0.2)  # another root, another (finer) mesh of the same scene
    with caplog.at_level(logging.INFO, logger="pkd.common.seg_cache"):
        assert seg_cache.build_cache(other, path, [SCENE], progress=False) == {"written": 1, "kept": 0, "missing": []}
    assert len(caplog.records) == 1 and "rebuilding" in caplog.records[0].getMessage()
    cached = seg_cache.load_scene(seg_cache.open_cache(path), SCENE)
    np.testing.assert_array_equal(cached.xyz, read_scene(*scene_files(other / "scans" / SCENE)).xyz)
    assert seg_cache.verify_cache(path) == []


# ---- metrics, coverage, plots -----------------------------------------------------------------------------


def test_scene_ious_by_hand_with_ignored_and_absent_classes():
    label = np.array([0, 0, 0, 1, 1, 2, IGNORE, IGNORE])
    pred = np.array([0, 0, 1, 1, 3, 2, 0, 3])  # ignored points' predictions count nowhere
    matrix = metrics.scene_confusion(pred, label, 5, IGNORE)
    ious = metrics.class_ious(matrix)
    # class 0: TP 2, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: 1; class 3: predicted, absent -> 0;
    # class 4: absent from labels and predictions -> no IoU
    np.testing.assert_allclose(ious[:4], [2 / 3, 1 / 3, 1.0, 0.0])
    assert np.isnan(ious[4])
    assert metrics.mean_iou(ious) == pytest.approx((2 / 3 + 1 / 3 + 1 + 0) / 4)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(4 / 6)
    assert metrics.mean_iou(np.full(3, np.nan)) == 0.0


def test_coverage_passes_predict_every_vertex():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, [7.0, 5.0, 3.0], size=(5000, 3)).astype(np.float32)
    passes = coverage_passes(xyz, 2.0, 300, np.random.default_rng(1))
    assert all(len(idx) == 300 for idx, _ in passes)
    counts = np.bincount(np.concatenate([idx for idx, _ in passes]), minlength=len(xyz))
    assert counts.min() >= 1 and len(passes) < len(xyz) / 300 + 4 * 3  # one padded pass per column at most
    for idx, centre in passes:  # each pass stays inside its column
        assert (np.abs(xyz[idx, :2] - centre) <= 1.0 + 1e-6).all()


def test_iou_chart_title_is_not_clipped(tmp_path):
    fig = class_iou_figure(dict.fromkeys(class_names(), 50.0), "ScanNet val per-class IoU: " + "long " * 40)
    fig.tight_layout()
    fig.canvas.draw()
    title, box = fig.axes[0].title.get_window_extent(), fig.bbox
    assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1


# ---- head and optimizer (appendix A.2) ---------------------------------------------------------------------


def test_concat_head_puts_the_three_nearest_centres_features_side_by_side_nearest_first():
    centres = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [10, 0, 0]]])
    features = torch.tensor([[[1.0, 2], [3, 4], [5, 6], [7, 8]]])  # C = 2 per centre
    points = torch.tensor([[[0.9, 0, 0], [2.9, 0, 0], [9.0, 0, 0]]])
    out = concat_features(points, centres, features)
    assert out.shape == (1, 3, 6)  # 3·C
    expected = [[3, 4, 1, 2, 5, 6], [5, 6, 3, 4, 1, 2], [7, 8, 5, 6, 3, 4]]  # nearest, second, third
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float32), rtol=0, atol=0)
    skip = torch.full((1, 2, 3), -1.0)
    propagated = FeaturePropagation(8, [], gather="concat")(points, centres, skip, features)
    torch.testing.assert_close(propagated, torch.cat([skip, out.transpose(1, 2)], dim=1), rtol=0, atol=0)


def test_scene_segmenter_concatenates_by_default_and_keeps_the_interpolating_head():
    sizes = EncoderConfig(num_group=8, group_size=8, dim=16, depth=3, heads=2)
    concat, interp = SceneSegmenter(20, sizes), SceneSegmenter(20, sizes, "interp")
    assert concat.propagation.mlp[0].in_channels == 3 * 3 * 16 + 6  # 3 neighbours × 3 blocks × C, xyz, rgb
    assert interp.propagation.mlp[0].in_channels == 3 * 16 + 6
    assert concat.propagation.gather is concat_features and interp.propagation.gather is interpolate_features
    points, colors = torch.rand(2, 64, 3), torch.rand(2, 64, 3)
    assert concat.eval()(points, colors).shape == interp.eval()(points, colors).shape == (2, 64, 20)
    cfg = FinetuneConfig.for_task("scannet-seg", "x")
    assert (cfg.head, cfg.optimizer, cfg.epochs) == ("concat", "adam", 200)
    with pytest.raises(ConfigError, match="--head must be one of interp, concat, got 'mean'"):
        FinetuneConfig.for_task("scannet-seg", "x", head="mean")


def test_scannet_seg_default_optimizer_is_the_papers_adam():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    adam = FinetuneConfig.for_task("scannet-seg", "x").build_optimizer(model)
    assert type(adam) is torch.optim.Adam and len(adam.param_groups) == 1  # L2 decay on every parameter
    group = adam.param_groups[0]
    assert (group["lr"], group["weight_decay"], len(group["params"])) == (1e-3, 1e-2, 4)
    assert not group.get("decoupled_weight_decay", False)
    adamw = FinetuneConfig.for_task("scannet-seg", "x", optimizer="adamw").build_optimizer(model)
    assert type(adamw) is torch.optim.AdamW and sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 1e-2]
    assert type(FinetuneConfig.for_task("shapenetpart", "x").build_optimizer(model)) is torch.optim.AdamW


# ---- end to end -------------------------------------------------------------------------------------------


def test_finetune_then_test_score_every_vertex_and_compare_counts_the_run_once(tree, tmp_path):
    runner, run = CliRunner(), tmp_path / "run"
    args = ["--data", str(tree), "--splits", str(tree / "splits"), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(
        app,
        [
            "finetune",
            "scannet-seg",
            *args,
            "--init",
            "scratch",
            "--run-dir",
            str(run),
            "--epochs",
            "2",
            "--repeats",
            "2",
            "--batch-size",
            "2",
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert results["steps"] == 2 and len(results["history"]) == 2 and results["config"]["lr"] == 1e-3
    records = {r["metric"]: r for r in results["records"]}
    assert set(records) == {"miou", "overall_acc"} and results["schema"] == "pkd-results/1"
    assert {(r["benchmark"], r["unit"], r["seed"], r["run"]) for r in records.values()} == {
        ("scannet-seg", "%", 0, str(run))
    }
    assert records["miou"]["data"] == {"used": 1, "listed": 1, "split": "val"}
    assert records["miou"]["value"] == test["miou"] and records["overall_acc"]["value"] == test["overall_acc"]
    coverage = test["vertex_coverage"]
    vertices = len(read_scene(*scene_files(tree / "scans" / SCENE)).xyz)
    assert coverage["vertices"] == coverage["predicted_vertices"] == vertices and coverage["fraction"] == 1.0
    defined = [v for v in test["class_iou"].values() if v is not None]
    assert test["miou"] == pytest.approx(np.mean(defined)) and 0 <= test["overall_acc"] <= 100  # percent
    assert max(h["score"] for h in results["history"]) == pytest.approx(test["miou"])  # best.pt's mIoU, percent
    assert test["class_iou"]["toilet"] is None or test["class_iou"]["toilet"] == 0.0  # absent from the demo
    assert (run / "class_iou.png").stat().st_size > 0 and (run / "scene_top_view.png").stat().st_size > 0
    assert results["data"]["train_scenes"] == 1 and results["data"]["missing_val"] == []

    result = runner.invoke(app, ["test", "scannet-seg", str(run), *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rescored = json.loads((run / "test" / "results.json").read_text())
    again = rescored["test"]
    assert again["miou"] == pytest.approx(test["miou"]) and again["vertex_coverage"] == coverage  # best.pt, same passes
    assert [(r["metric"], r["run"], r["settings"]) for r in rescored["records"]] == [
        (r["metric"], r["run"], r["settings"]) for r in results["records"]
    ]
    assert (run / "test" / "scene_top_view.png").is_file()
    result = runner.invoke(app, ["test", "scannet-seg", str(run), *args, "--device", "cpu"])
    assert isinstance(result.exception, ConfigError) and "--overwrite" in str(result.exception)

    table = tmp_path / "compare" / "table.md"
    result = runner.invoke(app, ["compare", str(run), "--out", str(table)])
    assert result.exit_code == 0, result.output
    rows = {r["metric"]: r for r in json.loads(table.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"miou", "overall_acc"}
    assert rows["miou"]["benchmark"] == "scannet-seg" and rows["miou"]["n"] == 1  # finetune + re-score: one run
    assert rows["miou"]["mean"] == pytest.approx(test["miou"]) and rows["miou"]["init"] == "scratch"
    assert "| scannet-seg | miou | scratch | 0 | 1 |" in table.read_text() and "1/1 val" in table.read_text()


def test_finetune_resumes_bit_identically(tree, tmp_path):
    from pkd.train.downstream.run import FinetuneConfig, run_finetune

    cfg = FinetuneConfig.for_task(
        "scannet-seg",
        tree,
        splits=str(tree / "splits"),
        cache_dir=str(tmp_path / "c"),
        epochs=2,
        repeats=2,
        batch_size=2,
        num_points=128,
        num_group=8,
        dim=32,
        depth=3,
        heads=2,
        crop_size=8.0,
        device="cpu",
    )
    run_finetune(cfg, tmp_path / "straight", progress=False)
    run_finetune(dataclasses.replace(cfg, max_steps=1), tmp_path / "split", progress=False)
    assert run_finetune(cfg, tmp_path / "split", resume=True, progress=False)["steps"] == 2
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(
        torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"], straight, rtol=0, atol=0
    )


def as_v2_record(run: Path) -> None:
    """Rewrite a run's config.json and last.pt as pkd wrote them before --head and --optimizer (version 2)."""
    record = json.loads((run / "config.json").read_text())
    del record["config"]["head"], record["config"]["optimizer"]
    (run / "config.json").write_text(json.dumps({**record, "version": 2}))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["config"]["head"], ckpt["config"]["optimizer"]
    torch.save({**ckpt, "version": 2}, run / "last.pt")


def test_a_run_recorded_before_the_concat_head_resumes_and_tests_with_its_own_head(tree, tmp_path):
    runner = CliRunner()
    args = ["--data", str(tree), "--splits", str(tree / "splits"), "--cache-dir", str(tmp_path / "cache"), *TINY]
    args += flags(epochs=2, repeats=2, batch_size=2, init="scratch")
    old = flags(head="interp", optimizer="adamw")  # what every run before v3 trained with
    straight = runner.invoke(app, ["finetune", "scannet-seg", *args, *old, "--run-dir", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "old"
    result = runner.invoke(app, ["finetune", "scannet-seg", *args, *old, "--max-steps", "1", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    as_v2_record(run)
    result = runner.invoke(app, ["finetune", "scannet-seg", *args, "--run-dir", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and (results["config"]["head"], results["config"]["optimizer"]) == ("interp", "adamw")
    torch.testing.assert_close(
        torch.load(run / "last.pt", weights_only=True)["model"],
        torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"],
        rtol=0,
        atol=0,
    )
    assert json.loads((run / "config.json").read_text())["version"] == 2  # a resume leaves config.json as it was
    result = runner.invoke(app, ["test", "scannet-seg", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rescored = json.loads((run / "test" / "results.json").read_text())
    assert rescored["config"]["head"] == "interp" and rescored["test"]["miou"] == pytest.approx(results["test"]["miou"])


@pytest.mark.slow  # torchrun itself: test_distributed
def test_finetune_under_torchrun_builds_the_cache_once_and_rank_0_writes(tree, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "run"
    done = run_command(
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2),
        *("-m", "pkd.train", "finetune", "scannet-seg"),
        *flags(data=tree, splits=tree / "splits", cache_dir=tmp_path / "cache", init="scratch", run_dir=run),
        *flags(epochs=1, repeats=4, batch_size=4),
        *TINY,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 1
    assert results["test"]["vertex_coverage"]["fraction"] == 1.0
    assert seg_cache.verify_cache(tmp_path / "cache" / "scannet_seg.zarr") == []
