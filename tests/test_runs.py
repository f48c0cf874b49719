"""The run scaffold both training loops share (pkd.train.runs) and the learning-rate schedules (pkd.train.schedule)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkd.common.errors import ConfigError, TrainingError
from pkd.train import runs
from pkd.train.checkpoint import LAST, atomic_save, load_checkpoint
from pkd.train.downstream.config import RESUME_MAY_CHANGE, FinetuneConfig
from pkd.train.schedule import Schedule, epoch_lr, lr_at
from pkd.train.trainer import TrainConfig, train

from store_factory import make_store
from store_factory import tiny_config as config

PKD_TRAIN = str(Path(sys.executable).with_name("pkd-train"))
SHAPE = (
    r"{} was trained with different settings \(lr: {} -> {}\); resume with the same arguments \(only .* may "
    r"change\) or start a new run\."
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("runs") / "pairs.zarr", n=8, num_points=160, shard_size=4)


# ---- schedules ------------------------------------------------------------------------------------------


def test_step_schedule_hand_values():
    assert Schedule.of(epochs=250, warmup_epochs=10, steps_per_epoch=100) == Schedule(
        warmup=1000, total=25000, stop=25000
    )
    assert Schedule.of(epochs=250, warmup_epochs=10, steps_per_epoch=100, max_steps=500, stop_after=30) == Schedule(
        warmup=20, total=500, stop=30
    )
    rates = dict(lr=1e-3, min_lr=1e-5, warmup=4, total=14)
    assert [lr_at(s, **rates) for s in range(4)] == [0.25e-3, 0.5e-3, 0.75e-3, 1e-3]
    assert lr_at(4, **rates) == 1e-3
    assert lr_at(9, **rates) == 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5))
    assert lr_at(14, **rates) == lr_at(99, **rates) == 1e-5


def test_epoch_schedule_is_point_maes_coslr():
    rates = dict(lr=5e-4, min_lr=1e-6, warmup=10, total=300)
    assert epoch_lr(0, **rates) == 1e-6  # warm-up starts at min_lr
    assert epoch_lr(5, **rates) == 1e-6 + 5 * (5e-4 - 1e-6) / 10
    assert epoch_lr(10, **rates) == 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 10 / 300))
    assert epoch_lr(300, **rates) == epoch_lr(400, **rates) == 1e-6


# ---- the one resume rule ---------------------------------------------------------------------------------


def test_resume_rule_is_the_same_for_finetuning_and_distillation(store, tmp_path):
    fine = dataclasses.asdict(FinetuneConfig(task="modelnet40", data="d", device="cpu"))
    runs.check_resume({**fine, "device": "cuda:0", "max_steps": 3}, fine, RESUME_MAY_CHANGE, tmp_path)
    with pytest.raises(ConfigError, match=SHAPE.format(tmp_path, "0.0005", "0.001")):
        runs.check_resume(fine, {**fine, "lr": 1e-3}, RESUME_MAY_CHANGE, tmp_path)

    run = tmp_path / "distill"
    train(config(store, max_steps=2, stop_after=1), run, progress=False)
    ckpt = load_checkpoint(run / LAST)
    ckpt["config"] = {**ckpt["config"], "device": "cuda:0", "amp": True}  # as if it started on a GPU
    atomic_save(ckpt, run / LAST)
    assert train(config(store, max_steps=2, device="cpu"), run, resume=True, progress=False)["steps"] == 2
    with pytest.raises(ConfigError, match=SHAPE.format(run, "0.001", "0.5")):
        train(config(store, max_steps=2, lr=0.5), run, resume=True, progress=False)


def test_nested_settings_are_compared_by_their_dotted_keys(tmp_path):
    plain = config("s").to_dict()
    runs.check_resume(plain, {**plain, "loader_workers": 2, "save_every": 5}, runs.run_fields(TrainConfig), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.dim: 48 -> 64"):
        runs.check_resume(
            plain, {**plain, "model": {**plain["model"], "dim": 64}}, runs.run_fields(TrainConfig), tmp_path
        )
    assert {"device", "amp", "loader_workers", "stop_after", "save_every", "val_every"} <= set(
        runs.run_fields(TrainConfig)
    )
    assert "lr" not in runs.run_fields(TrainConfig)


def test_a_run_recorded_with_num_workers_resumes_from_the_console(store, tmp_path):
    run = tmp_path / "old"
    train(config(store, max_steps=2, stop_after=1), run, progress=False)
    record = json.loads((run / "config.json").read_text())
    del record["format"], record["version"]  # as runs before the rename wrote it: unversioned, num_workers
    record["config"]["num_workers"] = record["config"].pop("loader_workers")
    (run / "config.json").write_text(json.dumps(record))
    ckpt = load_checkpoint(run / LAST)
    del ckpt["format"], ckpt["version"]
    ckpt["config"]["num_workers"] = ckpt["config"].pop("loader_workers")
    atomic_save(ckpt, run / LAST)
    done = subprocess.run(
        [PKD_TRAIN, "distill", str(store), "--run-dir", str(run), "--resume", "--loader-workers", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "2 of 2 steps" in done.stdout


# ---- seeding, devices, the NaN guard ---------------------------------------------------------------------


def test_seed_everything_and_batch_generators_are_reproducible():
    runs.seed_everything(3)
    a = torch.rand(3)
    runs.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert torch.equal(
        torch.rand(2, generator=runs.batch_generator(0, 5)), torch.rand(2, generator=runs.batch_generator(0, 5))
    )
    assert not torch.equal(
        torch.rand(2, generator=runs.batch_generator(0, 5)),
        torch.rand(2, generator=runs.batch_generator(0, 5, stream=1)),
    )


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.resolve_device("auto") == "cpu" and runs.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="torch sees no CUDA device; pass --device cpu"):
        runs.resolve_device("cuda:1")


def test_nan_guard_names_the_step_what_is_left_and_the_fix(tmp_path):
    runs.check_finite(torch.tensor(1.5), 1, tmp_path, "Lower --lr.")
    with pytest.raises(
        TrainingError,
        match=r"loss became nan at step 3 \(epoch 1\); training stopped, no checkpoint "
        r"was written yet in .*\. Lower --lr\.$",
    ):
        runs.check_finite(torch.tensor(float("nan")), 3, tmp_path, "Lower --lr.", " (epoch 1)")
    atomic_save({}, tmp_path / LAST)
    with pytest.raises(TrainingError, match=r"inf at step 2; .*last good checkpoint .* is untouched"):
        runs.check_finite(torch.tensor(float("inf")), 2, tmp_path, "Lower --lr.")
