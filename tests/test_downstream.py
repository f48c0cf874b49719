"""Downstream evaluation: loaders on the real ModelNet40/ShapeNetPart fixtures, metrics against hand-computed
values, --init loading, and every command end to end with a tiny encoder."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pkd.common.errors import ConfigError, DataError, WeightsError
from pkd.train.downstream import metrics
from pkd.train.downstream.cli import compare_runs, finetune_app, probe_app
from pkd.train.downstream.cli import test_app as eval_app
from pkd.train.downstream.engine import best_over_epochs
from pkd.train.downstream.modelnet import load_modelnet40
from pkd.train.downstream.models import FeaturePropagation, PartSegmenter, PointClassifier, fetch_layers, init_encoder
from pkd.train.downstream.registry import UNION_FIELDS, benchmark, config_from_record
from pkd.train.downstream.run import FinetuneConfig, run_finetune
from pkd.train.downstream.shapenetpart import CATEGORIES, load_shapenetpart
from pkd.train.encoder import EncoderConfig, PointEncoder
from pkd.train.export import export_encoder

from _cli import flags
from conftest import require_fixture

TINY = dict(dim=48, depth=4, heads=4, num_group=16, group_size=8)
CAP = "02954340"


@pytest.fixture(scope="module")
def modelnet():
    root = require_fixture("modelnet40")
    return root / "modelnet40_normal_resampled", root / "splits"


@pytest.fixture(scope="module")
def shapenetpart():
    root = require_fixture("shapenetpart")
    return root / "torchpoints3d_cap_processed", root


# ---- loaders ----------------------------------------------------------------------------------------------


def test_modelnet_loader_reads_the_present_shapes(modelnet, tmp_path):
    data, splits = modelnet
    train = load_modelnet40(data, "train", splits=splits, num_points=256, allow_missing=True, cache_dir=tmp_path)
    test = load_modelnet40(data, "test", splits=splits, num_points=256, allow_missing=True)
    assert train.points.shape == (11, 256, 3) and test.points.shape == (9, 256, 3)
    assert train.missing == 9843 - 11 and test.missing == 2468 - 9
    assert len(train.classes) == 40 and train.labels.max() < 40
    assert train.classes[test.labels[test.names.index("airplane_0703")]] == "airplane"
    radius = np.linalg.norm(test.points, axis=-1).max(axis=1)
    np.testing.assert_allclose(radius, 1.0, atol=1e-5)
    np.testing.assert_allclose(test.points.mean(axis=1), 0.0, atol=1e-5)
    cached = load_modelnet40(data, "train", splits=splits, num_points=256, allow_missing=True, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    np.testing.assert_array_equal(cached.points, train.points)


def test_modelnet_errors_name_the_path_and_the_fix(modelnet, tmp_path):
    data, splits = modelnet
    with pytest.raises(DataError, match=r"airplane_0001\.txt.*--allow-missing"):
        load_modelnet40(data, "train", splits=splits, num_points=256)
    with pytest.raises(DataError, match=r"modelnet40_shape_names\.txt.*--splits"):
        load_modelnet40(data, "train", num_points=256)
    with pytest.raises(DataError, match="not a directory"):
        load_modelnet40(tmp_path / "nowhere", "train", splits=splits)
    (tmp_path / "lists").mkdir()
    shutil.copy(splits / "modelnet40_shape_names.txt", tmp_path / "lists")
    (tmp_path / "lists" / "modelnet40_train.txt").write_text("spaceship_0001\n")
    with pytest.raises(DataError, match="spaceship"):
        load_modelnet40(data, "train", splits=tmp_path / "lists", num_points=256)


def test_modelnet_pickles_need_trust(modelnet, tmp_path):
    _, splits = modelnet
    rng = np.random.default_rng(0)
    with open(tmp_path / "modelnet40_test_8192pts_fps.dat", "wb") as f:
        clouds = [rng.normal(size=(64, 6)).astype(np.float32)] * 3
        pickle.dump([clouds, [np.array([1]), np.array([2]), np.array([5])]], f)
    with pytest.raises(DataError, match="--trust-pickle"):
        load_modelnet40(tmp_path, "test", splits=splits)
    shapes = load_modelnet40(tmp_path, "test", splits=splits, trust_pickle=True)
    assert shapes.points.shape == (3, 64, 3) and shapes.labels.tolist() == [1, 2, 5]


def test_shapenetpart_loader_reads_the_fixture_layout(shapenetpart):
    data, meta = shapenetpart
    trainval = load_shapenetpart(data, "trainval", splits=meta, allow_missing=True)
    test = load_shapenetpart(data, "test", splits=meta, allow_missing=True)
    assert len(trainval.names) == 5 and len(test.names) == 11
    assert test.missing == 2874 - 11 and trainval.missing == 12137 + 1870 - 5
    assert set(test.categories.tolist()) == {CATEGORIES.index("Cap")}
    for points, parts in zip(test.points, test.parts):
        assert points.shape == (len(parts), 3) and set(parts.tolist()) <= {6, 7}
        assert abs(np.linalg.norm(points, axis=1).max() - 1.0) < 1e-5
    points, parts = test.sample(0, 2048, np.random.default_rng(0))
    assert points.shape == (2048, 3) and parts.shape == (2048,)


def test_shapenetpart_reads_the_official_layout_and_rejects_bad_data(shapenetpart, tmp_path):
    _, meta = shapenetpart
    root = tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    shutil.copytree(meta / "train_test_split", root / "train_test_split")
    shutil.copy(meta / "synsetoffset2category.txt", root)
    (root / CAP).mkdir()
    raw = meta / "raw_excerpt" / CAP / "c7122c44495a5ac6aceb0fa31f18f016.first_lines.txt"
    shutil.copy(raw, root / CAP / "c7122c44495a5ac6aceb0fa31f18f016.txt")
    shapes = load_shapenetpart(root, "test", allow_missing=True)
    assert shapes.names == [f"{CAP}/c7122c44495a5ac6aceb0fa31f18f016"] and shapes.points[0].shape == (100, 3)
    with pytest.raises(DataError, match=r"\.txt \(listed in the test split\) is missing.*--allow-missing"):
        load_shapenetpart(root, "test")
    lines = raw.read_text().splitlines()
    (root / CAP / "c7122c44495a5ac6aceb0fa31f18f016.txt").write_text("\n".join(lines[:-1] + ["0 0 0 0 0 1 12"]))
    with pytest.raises(DataError, match=r"Cap shape but has part labels \[12\]"):
        load_shapenetpart(root, "test", allow_missing=True)
    (root / "synsetoffset2category.txt").write_text("Spaceship\t99999999\n")
    with pytest.raises(DataError, match="Spaceship"):
        load_shapenetpart(root, "test", allow_missing=True)


# ---- metrics ----------------------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    label = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    assert metrics.overall_accuracy(pred, label) == pytest.approx(5 / 7)
    assert metrics.mean_class_accuracy(pred, label, num_classes=4) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    matrix = metrics.confusion_matrix(pred, label, 4)
    assert matrix[0].tolist() == [3, 1, 0, 0] and matrix[1].tolist() == [1, 1, 0, 0] and matrix.sum() == 7


def test_part_ious_by_hand_with_the_absent_part_rule():
    label = np.array([6, 6, 6, 7])
    pred = np.array([6, 6, 7, 7])
    np.testing.assert_allclose(metrics.part_ious(pred, label, (6, 7)), [2 / 3, 1 / 2])
    # part 12 is absent from both: IoU 1; part 13 predicted but absent from the label: IoU 0
    np.testing.assert_allclose(
        metrics.part_ious(np.array([14, 13]), np.array([14, 14]), (12, 13, 14, 15)), [1.0, 0.0, 0.5, 1.0]
    )
    ious, cats = [7 / 12, 0.625, 1.0], ["Cap", "Chair", "Chair"]
    assert metrics.shape_iou(pred, label, (6, 7)) == pytest.approx(7 / 12)
    assert metrics.instance_miou(ious) == pytest.approx((7 / 12 + 0.625 + 1.0) / 3)
    assert metrics.category_mious(ious, cats) == pytest.approx({"Cap": 7 / 12, "Chair": 0.8125})
    assert metrics.class_miou(ious, cats) == pytest.approx((7 / 12 + 0.8125) / 2)


# ---- models and --init ------------------------------------------------------------------------------------


def test_layer_indices_follow_point_mae_and_scale_with_depth():
    assert fetch_layers(12) == (3, 7, 11) and fetch_layers(4) == (0, 1, 3) and fetch_layers(6) == (1, 3, 5)
    with pytest.raises(WeightsError, match="--depth"):
        fetch_layers(2)


def test_models_shapes_and_three_nn_interpolation():
    points = torch.rand(2, 128, 3)
    assert PointClassifier(40, EncoderConfig(**TINY)).eval()(points).shape == (2, 40)
    assert PartSegmenter(50, 16, EncoderConfig(**TINY)).eval()(points, torch.tensor([2, 5])).shape == (2, 128, 50)
    centres, features = torch.rand(1, 5, 3), torch.rand(1, 5, 4)
    out = FeaturePropagation(4, [])(centres, centres, torch.zeros(1, 0, 5), features)
    torch.testing.assert_close(out.transpose(1, 2), features, atol=1e-4, rtol=0)


def pointmae_checkpoint(encoder: PointEncoder, prefix: str) -> dict:
    """Point-MAE's pre-training layout: DataParallel prefix, MAE_encoder + decoder + mask token."""
    state = {f"{prefix}MAE_encoder.{k}": v for k, v in encoder.state_dict().items()}
    return {
        "base_model": {
            **state,
            f"{prefix}mask_token": torch.zeros(1, 1, 48),
            f"{prefix}MAE_decoder.norm.weight": torch.ones(48),
        },
        "epoch": 300,
    }


def test_init_reports_used_keys_and_refuses_foreign_checkpoints(tmp_path):
    source = PointEncoder(48, 4, 4)
    torch.save(pointmae_checkpoint(source, "module."), tmp_path / "pointmae.pth")
    target = PointEncoder(48, 4, 4)
    report = init_encoder(target, tmp_path / "pointmae.pth")
    assert report["used"] == len(source.state_dict()) and report["missing"] == [] and report["unexpected"] == 2
    torch.testing.assert_close(target.state_dict(), source.state_dict())
    run = tmp_path / "run"
    run.mkdir()
    student = {f"MAE_encoder.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": {**student, "concept.q": torch.ones(1)}}, run / "last.pt")
    assert init_encoder(PointEncoder(48, 4, 4), run)["unexpected"] == 1
    exported = init_encoder(PointEncoder(48, 4, 4), export_encoder(run, tmp_path / "encoder.pth"))
    assert exported["used"] == len(source.state_dict()) and exported["unexpected"] == 0
    torch.save({"model": {"backbone.conv.weight": torch.ones(3)}}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="no Point-MAE encoder weights"):
        init_encoder(PointEncoder(48, 4, 4), tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="--depth"):
        init_encoder(PointEncoder(48, 6, 4), tmp_path / "pointmae.pth")
    assert init_encoder(PointEncoder(48, 4, 4), "scratch")["used"] == 0


# ---- end to end -------------------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    """The wiring the lead adds to pkd-train."""
    app = typer.Typer()
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(probe_app, name="probe")
    app.add_typer(eval_app, name="test")
    app.command("compare")(compare_runs)
    return app


TINY_CLI = flags(dim=48, depth=4, heads=4, num_group=16, device="cpu", allow_missing=True)


def grad_norms_at_each_step(monkeypatch) -> list[float]:
    """Every AdamW.step call from now on appends the gradient norm it steps with."""
    norms: list[float] = []
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return norms


def test_shapenetpart_steps_twice_per_batch_first_unclipped_as_point_mae(shapenetpart, tmp_path, monkeypatch):
    data, meta = shapenetpart
    norms = grad_norms_at_each_step(monkeypatch)
    cfg = FinetuneConfig.for_task(
        "shapenetpart",
        data,
        splits=str(meta),
        allow_missing=True,
        num_points=256,
        epochs=2,
        batch_size=2,
        grad_clip=1e-3,
        **TINY,
    )
    assert cfg.double_step and cfg.unclipped_step()
    results = run_finetune(cfg, tmp_path / "two", progress=False)
    assert results["steps"] == 4 and len(norms) == 8  # 5 train shapes in batches of 2, two epochs
    for unclipped, clipped in zip(norms[::2], norms[1::2]):
        assert unclipped > 1e-3 and clipped == pytest.approx(1e-3, rel=1e-3)  # the same gradients, clipped

    history = results["history"]
    assert len(history) == 2
    for metric in ("instance_miou", "class_miou"):
        top = max(history, key=lambda h: h[metric])
        assert results["best"]["over_epochs"][metric] == {"value": top[metric], "epoch": top["epoch"]}
    assert results["best"]["score"] == results["best"]["over_epochs"]["instance_miou"]["value"]

    norms.clear()
    result = CliRunner().invoke(
        finetune_app,
        [
            "shapenetpart",
            *flags(data=data, splits=meta, init="scratch", run_dir=tmp_path / "one"),
            *flags(num_points=256, batch_size=2, max_steps=1, grad_clip=1e-3, no_double_step=True),
            *TINY_CLI,
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(norms) == 1 and norms[0] == pytest.approx(1e-3, rel=1e-3)  # one step, clipped
    assert json.loads((tmp_path / "one" / "results.json").read_text())["config"]["double_step"] is False


def test_best_instance_and_class_miou_are_each_their_own_best_epoch():
    history = [
        {"epoch": 0, "instance_miou": 80.0, "class_miou": 70.0},
        {"epoch": 1, "instance_miou": 82.0, "class_miou": 69.0},
        {"epoch": 2, "instance_miou": 81.0, "class_miou": 75.0},
        {"epoch": 3, "instance_miou": 82.0, "class_miou": 71.0},
    ]
    assert best_over_epochs(history, ("instance_miou", "class_miou")) == {
        "instance_miou": {"value": 82.0, "epoch": 1},
        "class_miou": {"value": 75.0, "epoch": 2},
    }
    assert benchmark("shapenetpart").best_of == ("instance_miou", "class_miou")
    assert benchmark("modelnet40").best_of == ()


def test_every_command_runs_end_to_end(modelnet, shapenetpart, tmp_path):
    data, splits = modelnet
    source = PointEncoder(48, 4, 4)
    torch.save(pointmae_checkpoint(source, ""), tmp_path / "encoder.pth")
    runner, app = CliRunner(), cli_app()
    mn = [*flags(data=data, splits=splits, pool_points=300, num_points=128, cache_dir=tmp_path / "cache"), *TINY_CLI]
    result = runner.invoke(
        app,
        [
            "finetune",
            "modelnet40",
            *mn,
            *flags(init=tmp_path / "encoder.pth", run_dir=tmp_path / "cls", epochs=2, batch_size=4, votes=2),
        ],
    )
    assert result.exit_code == 0, result.output
    cls = json.loads((tmp_path / "cls" / "results.json").read_text())
    assert cls["steps"] == 4 and cls["init"]["used"] == len(source.state_dict()) and len(cls["history"]) == 2
    assert {"overall_acc", "mean_class_acc", "vote_overall_acc", "vote_mean_class_acc"} <= set(cls["test"])
    assert (tmp_path / "cls" / "confusion.png").stat().st_size > 0 and (tmp_path / "cls" / "best.pt").is_file()
    assert (tmp_path / "cls" / "best_vote.pt").is_file() and (tmp_path / "cls" / "curves.png").stat().st_size > 0
    assert all("vote_overall_acc" in h for h in cls["history"])
    assert cls["best"]["vote_score"] == max(h["vote_overall_acc"] for h in cls["history"])
    records = {r["metric"]: r for r in cls["records"]}
    assert set(records) == {"overall_acc", "mean_class_acc", "vote_overall_acc", "best_vote_overall_acc"}
    assert records["overall_acc"]["value"] == cls["test"]["overall_acc"] and records["overall_acc"]["unit"] == "%"
    assert records["overall_acc"]["data"] == {"used": 9, "listed": 2468, "split": "test"}
    assert "9/2468 test shapes (--allow-missing)" in result.output
    assert cls["test"]["overall_acc"] == pytest.approx(100 * np.trace(cls["test"]["confusion_matrix"]) / 9)

    result = runner.invoke(
        app, ["test", "modelnet40", str(tmp_path / "cls"), "--votes", "2", "--passes", "3", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    voted = json.loads((tmp_path / "cls" / "test_votes.json").read_text())
    passes = voted["vote_passes"]
    assert len(passes) == 3 and voted["summary"]["best"] == max(passes)
    assert voted["summary"]["mean"] == pytest.approx(np.mean(passes))
    assert {r["metric"] for r in voted["records"]} == {"vote_pass_mean", "vote_pass_std", "vote_pass_best"}
    result = runner.invoke(app, ["test", "modelnet40", str(tmp_path / "cls"), "--votes", "2", "--passes", "3"])
    assert isinstance(result.exception, ConfigError) and "--overwrite" in str(result.exception)

    result = runner.invoke(app, ["probe", "modelnet40", *mn, "--init", "scratch", "--run-dir", str(tmp_path / "probe")])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((tmp_path / "probe" / "results.json").read_text())["test"]["overall_acc"] <= 100
    assert (tmp_path / "probe" / "config.json").is_file()

    part_data, meta = shapenetpart
    result = runner.invoke(
        app,
        [
            "finetune",
            "shapenetpart",
            *flags(data=part_data, splits=meta, init="scratch", run_dir=tmp_path / "seg"),
            *flags(num_points=256, epochs=1, batch_size=2),
            *TINY_CLI,
        ],
    )
    assert result.exit_code == 0, result.output
    seg = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert seg["data"]["train_shapes"] == 5 and seg["data"]["test_shapes"] == 11 and seg["steps"] == 2
    assert 1 < seg["test"]["instance_miou"] <= 100 and seg["test"]["class_miou"] == seg["test"]["category_miou"]["Cap"]
    assert {r["metric"] for r in seg["records"]} == {"instance_miou", "class_miou"}
    assert seg["config"]["decay_epochs"] is None  # cosine over all epochs (Point-MAE segmentation/main.py)
    assert (tmp_path / "seg" / "category_iou.png").stat().st_size > 0

    result = runner.invoke(
        app,
        [
            "finetune",
            "modelnet40",
            "--data",
            str(tmp_path / "nowhere"),
            "--init",
            "scratch",
            "--run-dir",
            str(tmp_path / "bad"),
        ],
    )
    assert isinstance(result.exception, DataError) and "nowhere" in str(result.exception)


def test_resume_continues_bit_identically(modelnet, tmp_path):
    data, splits = modelnet
    cfg = FinetuneConfig.for_task(
        "modelnet40",
        data,
        splits=str(splits),
        allow_missing=True,
        pool_points=300,
        num_points=128,
        epochs=2,
        warmup_epochs=1,
        batch_size=4,
        votes=1,
        **TINY,
    )
    run_finetune(cfg, tmp_path / "straight", progress=False)
    run_finetune(dataclasses.replace(cfg, max_steps=3), tmp_path / "split", progress=False)
    resumed = run_finetune(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed["steps"] == 4
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(
        torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"], straight, rtol=0, atol=0
    )
    with pytest.raises(ConfigError, match="different settings"):
        run_finetune(dataclasses.replace(cfg, lr=1e-3), tmp_path / "split", resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_finetune(cfg, tmp_path / "straight", progress=False)


def test_cli_resume_takes_the_runs_recorded_options(modelnet, tmp_path):
    data, splits = modelnet
    runner, app = CliRunner(), cli_app()
    common = [
        "finetune",
        "modelnet40",
        "--data",
        str(data),
        "--splits",
        str(splits),
        "--pool-points",
        "300",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--init",
        "scratch",
        "--run-dir",
        str(tmp_path / "run"),
        *TINY_CLI,
    ]
    first = runner.invoke(
        app, [*common, "--num-points", "128", "--epochs", "2", "--batch-size", "4", "--votes", "1", "--max-steps", "3"]
    )
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, [*common, "--resume"])  # no --num-points/--epochs/--batch-size retyped
    assert resumed.exit_code == 0, resumed.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4 and results["config"]["batch_size"] == 4 and results["config"]["max_steps"] is None
    clash = runner.invoke(app, [*common, "--resume", "--batch-size", "8"])
    assert isinstance(clash.exception, ConfigError) and "(batch_size: 4 -> 8)" in str(clash.exception)


def test_downstream_never_imports_the_teacher():
    code = (
        "import sys, pkd.train.downstream.cli, pkd.train.downstream.run; "
        "bad = [m for m in ('open_clip', 'transformers', 'pkd.preprocess') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- options derived from the configs ---------------------------------------------------------------------

OLD_FINETUNE_FIELDS = {  # FinetuneConfig's recorded layout before EncoderConfig (config.json, last.pt)
    "task",
    "data",
    "init",
    "splits",
    "epochs",
    "warmup_epochs",
    "decay_epochs",
    "batch_size",
    "lr",
    "min_lr",
    "weight_decay",
    "grad_clip",
    "seed",
    "device",
    "max_steps",
    "allow_missing",
    "trust_pickle",
    "cache_dir",
    "num_points",
    "pool_points",
    "votes",
    "dim",
    "depth",
    "heads",
    "drop_path",
    "num_group",
    "group_size",
    "variant",
    "way",
    "shot",
    "fold",
    "folds",
    "crop_size",
    "repeats",
}


ADDED_SHAPENETPART_FIELDS = {"double_step"}  # since the union config (record version 3)


def test_recorded_finetune_configs_keep_their_flat_layout():
    cfg = FinetuneConfig.for_task("shapenetpart", "x", dim=48, heads=4)
    recorded = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert set(recorded) == OLD_FINETUNE_FIELDS - UNION_FIELDS | {"splits", "allow_missing"} | ADDED_SHAPENETPART_FIELDS
    assert config_from_record(recorded) == cfg


def test_records_of_the_union_config_load_as_their_benchmarks_config():
    cfg = FinetuneConfig.for_task("shapenetpart", "x", dim=48, heads=4)
    union = {"pool_points": 8192, "votes": 0, "variant": None, "way": 0, "shot": 0, "fold": 0, "folds": None}
    recorded = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ADDED_SHAPENETPART_FIELDS}
    old = {**recorded, **union, "trust_pickle": False, "cache_dir": None, "crop_size": 3.0, "repeats": 1}
    assert set(old) == OLD_FINETUNE_FIELDS
    assert config_from_record(old) == cfg
    with pytest.raises(ConfigError, match="unknown keys colour_jitter"):
        config_from_record({**old, "colour_jitter": 0.1})


def _option_help(*command: str) -> dict[str, str]:
    """``--flag`` → its help line, from a subcommand's --help."""
    out = CliRunner().invoke(cli_app(), [*command, "--help"], env={"COLUMNS": "250"}).output
    return {m.group(1): line for line in out.splitlines() if (m := re.search(r"(--[a-z-]+)\s", line))}


@pytest.mark.parametrize(
    ("task", "shown"),
    [
        ("modelnet40", {"--epochs": "300", "--batch-size": "32", "--num-group": "64", "--votes": "10"}),
        ("shapenetpart", {"--lr": "0.0002", "--num-points": "2048", "--num-group": "128"}),
        ("scannet-seg", {"--epochs": "200", "--num-points": "8192", "--num-group": "256", "--weight-decay": "0.01"}),
        ("scanobjectnn", {"--variant": "pb_t50_rs", "--num-points": "2048"}),
        ("fewshot", {"--epochs": "150", "--way": "5", "--shot": "10"}),
    ],
)
def test_each_finetune_subcommand_shows_its_tasks_defaults(task, shown):
    helps = _option_help("finetune", task)
    for flag, value in shown.items():
        assert f"[default: {value}]" in helps[flag], helps[flag]
    for flag in ("--dim", "--depth", "--heads", "--drop-path", "--num-group", "--group-size"):
        assert flag in helps


@pytest.mark.parametrize(
    ("command", "absent"),
    [
        (
            ("finetune", "shapenetpart"),
            ("--votes", "--pool-points", "--crop-size", "--way", "--variant", "--trust-pickle"),
        ),
        (("finetune", "scanobjectnn"), ("--votes", "--splits", "--repeats", "--fold-files", "--cache-dir")),
        (("finetune", "scannet-seg"), ("--votes", "--pool-points", "--way", "--variant", "--trust-pickle")),
        (("finetune", "modelnet40"), ("--crop-size", "--repeats", "--way", "--shot", "--variant")),
        (("probe", "modelnet40"), ("--drop-path", "--epochs", "--votes")),
    ],
)
def test_options_not_meant_for_a_command_are_not_offered(command, absent):
    helps = _option_help(*command)
    assert not set(absent) & set(helps)
    result = CliRunner().invoke(cli_app(), [*command, absent[0], "1"])
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dim", "50", "--heads", "4"], "dim 50 is not divisible by heads 4"),
        (["--drop-path", "1.5"], "drop_path 1.5 must lie in [0, 1)"),
        (["--group-size", "0"], "group_size 0: must be at least 1"),
    ],
)
def test_bad_encoder_sizes_exit_2_with_one_line(tmp_path, flags, message):
    pkd_train = Path(sys.executable).with_name("pkd-train")
    done = subprocess.run(
        [
            str(pkd_train),
            "finetune",
            "modelnet40",
            "--data",
            str(tmp_path),
            "--init",
            "scratch",
            "--run-dir",
            str(tmp_path / "run"),
            *flags,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr
