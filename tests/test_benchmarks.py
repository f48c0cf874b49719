"""ScanObjectNN, few-shot folds, voting statistics, the results schema and ``compare``: hand-computed numbers,
small files in the official formats, and the exit paths through the installed ``pkd-train``."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pkd.common.errors import DataError
from pkd.train.downstream import metrics
from pkd.train.downstream.cli import compare_runs, finetune_app
from pkd.train.downstream.compare import format_markdown, group_records
from pkd.train.downstream.config import FinetuneConfig
from pkd.train.downstream.fewshot import generate_fold, read_fold
from pkd.train.downstream.modelnet import ShapeSet
from pkd.train.downstream.models import init_encoder
from pkd.train.downstream.results import make_records, settings_digest
from pkd.train.downstream.sampling import shuffle_points
from pkd.train.encoder import PointEncoder
from pkd.train.export import export_encoder
from pkd.train.schedule import epoch_lr

from _cli import flags, run_script

TINY = flags(dim=32, depth=1, heads=2, num_group=8, device="cpu", batch_size=4, epochs=1)


def app() -> typer.Typer:
    out = typer.Typer()
    out.add_typer(finetune_app, name="finetune")
    out.command("compare")(compare_runs)
    return out


# ---- numbers by hand --------------------------------------------------------------------------------------


def test_vote_accuracy_and_repeat_statistics_by_hand():
    label = np.array([0, 1, 1])
    # vote 1 predicts [0, 0, 1], vote 2 [1, 1, 1]; their mean [0: 0.6>0.4, 1: 0.45<0.55, 1] → 3/3
    logits = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [[0.3, 0.7], [0.3, 0.7], [0.4, 0.6]]])
    assert metrics.vote_accuracy(logits, label) == pytest.approx(1.0)
    assert metrics.vote_accuracy(logits[:1], label) == pytest.approx(2 / 3)
    stats = metrics.mean_std_best([90.0, 92.0, 94.0, 92.0])
    assert stats == {"mean": pytest.approx(92.0), "std": pytest.approx(math.sqrt(2.0)), "best": 94.0, "n": 4}


def test_training_clouds_are_shuffled_per_cloud_and_seeded():
    points = torch.arange(2 * 50 * 3, dtype=torch.float32).reshape(2, 50, 3)
    a = shuffle_points(points, torch.Generator().manual_seed(1))
    b = shuffle_points(points, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    for cloud in range(2):
        assert sorted(a[cloud, :, 0].tolist()) == points[cloud, :, 0].tolist()  # a permutation of its own points
        torch.testing.assert_close(a[cloud, :, 1] - a[cloud, :, 0], torch.ones(50))  # rows stay whole
    assert not torch.equal(a[0] - points[0, 0], a[1] - points[1, 0])  # each cloud its own order
    assert a[:, 0, 0].tolist() != [0.0, 150.0]  # FPS no longer starts at index 0


def test_shapenetpart_cosine_spans_all_epochs():
    cfg = FinetuneConfig.for_task("shapenetpart", "x", epochs=300)
    lrs = [
        epoch_lr(e, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_epochs, total=cfg.decay_epochs or cfg.epochs)
        for e in range(300)
    ]
    assert lrs[100] > 1e-4 and lrs[299] > cfg.min_lr  # before: the floor from epoch 100 on
    assert lrs[299] == pytest.approx(cfg.min_lr + 0.5 * (2e-4 - cfg.min_lr) * (1 + math.cos(math.pi * 299 / 300)))


# ---- ScanObjectNN -----------------------------------------------------------------------------------------


def write_scanobjectnn(root: Path, sub: str, suffix: str, n_train: int = 12, n_test: int = 6, points: int = 96):
    """h5 files as the official release writes them: datasets data (N, P, 3) float32 and label (N,) uint8."""
    rng = np.random.default_rng(0)
    (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, n in (("training_objectdataset", n_train), ("test_objectdataset", n_test)):
        with h5py.File(root / sub / f"{stem}{suffix}.h5", "w") as h5:
            h5["data"] = rng.normal(size=(n, points, 3)).astype(np.float32)
            h5["label"] = (np.arange(n) % 15).astype(np.uint8)
            h5["mask"] = np.zeros((n, points), dtype=np.int32)


@pytest.mark.parametrize(
    "variant,sub,suffix",
    [
        ("obj_bg", "main_split", ""),
        pytest.param("pb_t50_rs", "main_split", "_augmentedrot_scale75", marks=pytest.mark.slow),
        pytest.param("obj_only", "main_split_nobg", "", marks=pytest.mark.slow),
    ],
)  # one variant end to end in the default tier; the other file layouts with --slow
def test_scanobjectnn_variant_runs_end_to_end(variant, sub, suffix, tmp_path):
    write_scanobjectnn(tmp_path / "h5_files", sub, suffix)
    result = CliRunner().invoke(
        app(),
        [
            "finetune",
            "scanobjectnn",
            "--data",
            str(tmp_path / "h5_files"),
            "--variant",
            variant,
            "--init",
            "scratch",
            "--run-dir",
            str(tmp_path / "run"),
            "--num-points",
            "96",
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["steps"] == 3 and out["config"]["votes"] == 0 and out["config"]["num_points"] == 96
    assert out["data"]["coverage"] == {"used": 6, "listed": 6, "split": "test"}
    assert {r["metric"] for r in out["records"]} == {"overall_acc", "mean_class_acc"}
    assert all(r["benchmark"] == f"scanobjectnn/{variant}" and 0 <= r["value"] <= 100 for r in out["records"])
    assert out["records"][0]["protocol"].startswith("Point-MAE cfgs/finetune_scan_")


def test_scanobjectnn_defaults_follow_point_mae_and_errors_name_the_file(tmp_path):
    cfg = FinetuneConfig.for_task("scanobjectnn", "x", variant="obj_bg")
    assert (
        cfg.num_points,
        cfg.num_group,
        cfg.epochs,
        cfg.warmup_epochs,
        cfg.lr,
        cfg.weight_decay,
        cfg.batch_size,
        cfg.grad_clip,
        cfg.votes,
    ) == (2048, 128, 300, 10, 5e-4, 0.05, 32, 10.0, 0)
    write_scanobjectnn(tmp_path, "main_split", "")

    def finetune(variant: str):
        options = flags(data=tmp_path, variant=variant, init="scratch", run_dir=tmp_path / "r")
        return CliRunner().invoke(app(), ["finetune", "scanobjectnn", *options, *TINY])

    result = finetune("pb_t50_rs")
    assert isinstance(result.exception, DataError)
    assert "training_objectdataset_augmentedrot_scale75.h5" in str(result.exception)
    (tmp_path / "main_split" / "test_objectdataset.h5").write_bytes(b"not hdf5")
    result = finetune("obj_bg")
    assert isinstance(result.exception, DataError) and "test_objectdataset.h5" in str(result.exception)


# ---- few-shot ---------------------------------------------------------------------------------------------


def write_fold(root: Path, way: int, shot: int, fold: int, points: int = 128) -> None:
    """A fold pickle in generate_few_shot_data.py's layout: {'train': [(points, i, key)], 'test': [...]}."""
    rng = np.random.default_rng(fold)
    keys = rng.permutation(40)[:way].astype(np.int32)
    dataset = {
        split: [(rng.normal(size=(points, 6)).astype(np.float32), i, keys[i]) for i in range(way) for _ in range(count)]
        for split, count in (("train", shot), ("test", 3))
    }
    (root / f"{way}way_{shot}shot").mkdir(parents=True, exist_ok=True)
    with open(root / f"{way}way_{shot}shot" / f"{fold}.pkl", "wb") as f:
        pickle.dump(dataset, f)


class Payload:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_fold_files_load_without_code_and_a_payload_is_refused(tmp_path):
    write_fold(tmp_path, 5, 2, 0)
    train, test, digest = read_fold(tmp_path / "5way_2shot" / "0.pkl")
    assert train.points.shape == (10, 128, 3) and test.points.shape == (15, 128, 3) and len(digest) == 64
    assert sorted(train.labels.tolist()) == sorted([0, 1, 2, 3, 4] * 2)
    np.testing.assert_allclose(np.linalg.norm(train.points, axis=-1).max(axis=1), 1.0, atol=1e-5)
    marker = tmp_path / "pwned"
    (tmp_path / "evil" / "5way_2shot").mkdir(parents=True)
    with open(tmp_path / "evil" / "5way_2shot" / "0.pkl", "wb") as f:
        pickle.dump({"train": [Payload(marker)], "test": []}, f)
    with pytest.raises(DataError, match=r"refused .*posix\.system|refused .*os\.system"):
        read_fold(tmp_path / "evil" / "5way_2shot" / "0.pkl")
    assert not marker.exists()
    done = run_script(
        "pkd-train",
        "finetune",
        "fewshot",
        *flags(fold_files=tmp_path / "evil", shot=2, fold=0, init="scratch", run_dir=tmp_path / "run", device="cpu"),
    )
    assert done.returncode == 2 and "refused" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_generated_folds_are_seeded_and_shaped_like_the_published_ones():
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(8)]
    train = ShapeSet(
        rng.normal(size=(8 * 12, 16, 3)).astype(np.float32),
        np.repeat(np.arange(8), 12),
        [str(i) for i in range(96)],
        classes,
    )
    test = ShapeSet(
        rng.normal(size=(8 * 25, 16, 3)).astype(np.float32),
        np.repeat(np.arange(8), 25),
        [str(i) for i in range(200)],
        classes,
    )
    a_train, a_test = generate_fold(train, test, way=5, shot=10, fold=3, seed=0)
    b_train, _ = generate_fold(train, test, way=5, shot=10, fold=3, seed=0)
    c_train, _ = generate_fold(train, test, way=5, shot=10, fold=4, seed=0)
    np.testing.assert_array_equal(a_train.points, b_train.points)
    assert not np.array_equal(a_train.points, c_train.points)
    assert np.bincount(a_train.labels).tolist() == [10] * 5 and np.bincount(a_test.labels).tolist() == [20] * 5
    with pytest.raises(DataError, match="fewer than the 20"):
        generate_fold(train, ShapeSet(test.points[:40], test.labels[:40], test.names[:40], classes), 5, 10, 0, 0)


def run_fewshot(tmp_path: Path, second_fold: int, *extra: str):
    """`pkd-train finetune fewshot` (in process) on 5-way 2-shot folds 0 and ``second_fold`` under tmp_path/folds."""
    return CliRunner().invoke(
        app(),
        [
            "finetune",
            "fewshot",
            *flags(fold_files=tmp_path / "folds", way=5, shot=2, fold=0),
            *flags(fold=second_fold, init="scratch"),
            *extra,
            *flags(run_dir=tmp_path / "fs", num_points=64),
            *TINY,
        ],
    )


def test_fewshot_runs_folds_and_reports_mean_and_std(tmp_path):
    for fold in (0, 1):
        write_fold(tmp_path / "folds", 5, 2, fold)
    result = run_fewshot(tmp_path, 1)
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "fs" / "results.json").read_text())
    folds = [json.loads((tmp_path / "fs" / f"fold{k}" / "results.json").read_text()) for k in (0, 1)]
    accs = [f["test"]["overall_acc"] for f in folds]
    assert out["folds"] == {"0": accs[0], "1": accs[1]}
    values = {r["metric"]: r["value"] for r in out["records"]}
    assert values["fold_mean"] == pytest.approx(np.mean(accs)) and values["fold_std"] == pytest.approx(np.std(accs))
    assert folds[0]["config"]["epochs"] == 1 and folds[0]["data"]["fold"]["source"].endswith("0.pkl")
    assert folds[0]["records"][0]["benchmark"] == "fewshot/5way2shot" and folds[0]["data"]["test_shapes"] == 15
    write_fold(tmp_path / "folds", 5, 2, 2)
    result = run_fewshot(tmp_path, 2, "--resume")
    assert result.exit_code == 0, result.output  # fold 0 is continued (already done), fold 2 started
    out = json.loads((tmp_path / "fs" / "results.json").read_text())
    assert out["folds"] == {"0": accs[0], "1": accs[1], "2": out["folds"]["2"]}  # earlier fold 1 kept
    assert out["summary"]["n"] == 3 and out["summary"]["mean"] == pytest.approx(np.mean(list(out["folds"].values())))


# ---- results schema, random-teacher provenance and compare -----------------------------------------------


def test_export_records_a_random_teacher_and_init_warns(tmp_path, caplog):
    run = tmp_path / "distill"
    run.mkdir()
    source = PointEncoder(32, 1, 2)
    torch.save({"model": {f"MAE_encoder.{k}": v for k, v in source.state_dict().items()}}, run / "last.pt")
    teacher = {"kind": "random", "random": True, "seed": 0}
    store = {"path": "pairs.zarr", "targets": "clipcap/prefix", "teacher": teacher}
    (run / "config.json").write_text(json.dumps({"store": store}))
    exported = export_encoder(run, tmp_path / "encoder.pth")
    recorded = {"store": "pairs.zarr", "targets": "clipcap/prefix", "teacher": teacher}
    assert torch.load(exported, weights_only=True)["pkd"] == recorded
    report = init_encoder(PointEncoder(32, 1, 2), exported)
    assert report["random_teacher"] is True and report["teacher"] == teacher
    assert "RANDOM TEACHER" in caplog.text
    assert init_encoder(PointEncoder(32, 1, 2), "scratch").get("random_teacher") is None


def record(benchmark: str, value: float, seed: int, init: str = "scratch", **config) -> dict:
    return make_records(
        benchmark,
        {"overall_acc": value},
        init_report={"init": init},
        config={"seed": seed, "lr": 5e-4, **config},
        data={"used": 9, "listed": 2468, "split": "test"},
        protocol="p",
        run_dir=f"runs/{benchmark}-{seed}-{value}",
    )[0]


def test_compare_groups_equal_settings_over_seeds(tmp_path):
    assert settings_digest({"seed": 0, "lr": 1, "device": "cpu"}) == settings_digest({"seed": 5, "lr": 1})
    records = [
        record("modelnet40", 90.0, 0),
        record("modelnet40", 92.0, 1),
        record("modelnet40", 95.0, 0, lr=1e-3),
        record("modelnet40", 80.0, 0, init="runs/x/encoder.pth"),
    ]
    rows = group_records(records)
    assert group_records(records + [dict(records[0])]) == rows  # the same run's record read twice counts once
    assert [(r["init"], r["n"], r["mean"]) for r in rows if r["n"] == 2] == [("scratch", 2, 91.0)]
    assert next(r for r in rows if r["n"] == 2)["std"] == pytest.approx(1.0) and len(rows) == 3
    assert (
        "| modelnet40 | overall_acc | scratch | 0, 1 | 2 | 91.00 ± 1.00 % | 9/2468 test (partial) |"
        in format_markdown(rows)
    )
    for i, r in enumerate(records):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "results.json").write_text(json.dumps({"schema": "pkd-results/1", "records": [r]}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"test": {"overall_acc": 0.9}}))
    result = CliRunner().invoke(app(), ["compare", str(tmp_path), "--out", str(tmp_path / "cmp" / "table.md")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert len(table["rows"]) == 3 and "old/results.json" in table["skipped"][0]
    assert (tmp_path / "cmp" / "table.png").stat().st_size > 0
    done = run_script("pkd-train", "compare", tmp_path, "--out", tmp_path / "cmp" / "table.md")
    assert done.returncode == 2 and "--overwrite" in done.stderr
    done = run_script("pkd-train", "compare", tmp_path / "old", cwd=tmp_path)
    assert done.returncode == 2 and "no pkd-results/1 results" in done.stderr


def test_usage_errors_exit_cleanly_through_the_console_script(tmp_path):
    cases = [
        (["test", "modelnet40", str(tmp_path)], "no config.json"),
        (["finetune", "fewshot", "--init", "scratch"], "--fold-files"),
        (
            [
                "finetune",
                "scanobjectnn",
                "--data",
                str(tmp_path),
                "--variant",
                "hardest",
                "--init",
                "scratch",
                "--run-dir",
                str(tmp_path / "r"),
                "--device",
                "cpu",
            ],
            "obj_bg, obj_only, pb_t50_rs",
        ),
    ]
    for args, message in cases:
        done = run_script("pkd-train", *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "r").exists()
