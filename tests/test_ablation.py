"""Issue 11: the paper's concept head, decoder depth, --max-steps schedules, held-out loss, checkpoint size,
resume from a run's config, and `pkd-train ablate` read out on the real ModelNet40 fixture."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pkd.common.errors import ConfigError
from pkd.train.ablate import Readout, run_ablation
from pkd.train.checkpoint import LAST, load_checkpoint
from pkd.train.config import TrainConfig
from pkd.train.export import export_encoder
from pkd.train.model import Student, StudentConfig
from pkd.train.schedule import Schedule, lr_at
from pkd.train.trainer import train

from _cli import TINY_STUDENT as TINY
from _cli import flags, run_script
from conftest import require_fixture
from store_factory import clipcap_target_shape, make_store

TINY_CLI = flags(**TINY, batch_size=4, epochs=3, warmup_epochs=1, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """16 train samples (4 batches of 4) and 6 held-out ones."""
    path = make_store(tmp_path_factory.mktemp("abl") / "pairs.zarr", n=16, num_points=160, shard_size=4)
    return make_store(path, n=6, num_points=160, shard_size=4, seed=1, split="val", add_split=True)


def config(store, variant="distill", **kw) -> TrainConfig:
    model = StudentConfig(**{**TINY, **kw.pop("model", {})}, variant=variant)
    return TrainConfig(store=str(store), model=model, epochs=3, warmup_epochs=1, batch_size=4, **kw)


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def pkd_train(*args, cwd) -> subprocess.CompletedProcess:
    return run_script("pkd-train", *args, timeout=None, cwd=cwd)


# ---- model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head, changes", [("flat", True), ("pooled", False)])
def test_the_flat_head_reads_every_concept_and_the_pooled_one_cannot_tell_them_apart(head, changes):
    torch.manual_seed(0)
    student = Student(StudentConfig(**TINY, head=head, target_shape=clipcap_target_shape("distill"))).eval()
    points = torch.randn(2, 128, 3)
    before = student(points).pred
    with torch.no_grad():
        student.concept.queries.copy_(student.concept.queries[:, [1, 0, 3, 2]])
    after = student(points).pred
    assert torch.allclose(before, after, atol=1e-5) is not changes
    assert student.head.fc1.in_features == (4 * 48 if head == "flat" else 2 * 48)


def test_decoder_depth_and_config_checks():
    assert len(Student(StudentConfig(**TINY, variant="recon")).MAE_decoder.blocks.blocks) == 3
    assert len(Student(StudentConfig(**TINY, variant="recon", decoder_depth=2)).MAE_decoder.blocks.blocks) == 2
    with pytest.raises(ConfigError, match="unknown head 'mean'"):
        StudentConfig(head="mean")
    with pytest.raises(ConfigError, match="unknown variant"):
        StudentConfig(variant="distil")
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(store="s", min_lr=1.0)


# ---- schedule, held-out loss, checkpoints --------------------------------------------------------------------


def test_max_steps_makes_the_whole_schedule():
    cfg = TrainConfig(store="s", epochs=250, warmup_epochs=10, max_steps=2000)
    sched = Schedule.of(
        epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, steps_per_epoch=3000, max_steps=cfg.max_steps
    )
    assert (sched.warmup, sched.total, sched.stop) == (80, 2000, 2000)
    rates = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup=sched.warmup, total=sched.total)
    assert lr_at(sched.warmup - 1, **rates) == cfg.lr  # the peak is reached
    assert lr_at(sched.total, **rates) == pytest.approx(cfg.min_lr)
    assert lr_at(1040, **rates) == pytest.approx((cfg.lr + cfg.min_lr) / 2)  # cosine midpoint
    plain = Schedule.of(epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, steps_per_epoch=3000, stop_after=7)
    assert (plain.warmup, plain.total, plain.stop) == (30000, 750000, 7)


def test_a_run_logs_its_schedule_and_says_when_it_stops_inside_warm_up(store, tmp_path):
    summary = train(config(store, max_steps=6), tmp_path / "full", progress=False)
    lrs = [r["lr"] for r in records(tmp_path / "full", "step")]
    assert summary["warmup_steps"] == 2 and summary["schedule_steps"] == 6 and not summary["in_warmup"]
    assert lrs[:2] == pytest.approx([0.5e-3, 1e-3])  # warm-up reaches the peak
    assert lrs[2] == lrs[1] and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.2e-3  # then the cosine
    stopped = train(config(store, max_steps=6, stop_after=1), tmp_path / "early", progress=False)
    assert stopped["in_warmup"] and stopped["steps"] == 1
    record = json.loads((tmp_path / "full" / "config.json").read_text())["config"]
    assert record["amp"] is False and record["device"] == "cpu"  # never claims bf16 autocast on CPU


def test_held_out_loss_every_epoch_and_every_n_steps_resumes_identically(store, tmp_path):
    cfg = config(store, "distill", max_steps=6, val_every=3, val_max_samples=5, monitor_recon=True)
    summary = train(cfg, tmp_path / "straight", progress=False)
    vals = records(tmp_path / "straight", "val")
    assert [(r["epoch"], r["step"]) for r in vals] == [(0, 3), (0, 4), (1, 6)]
    assert all(r["samples"] == 5 and r["loss"] > 0 and r["monitor_recon"] > 0 for r in vals)
    assert summary["val_loss"] == vals[-1]["loss"]
    train(dataclasses.replace(cfg, stop_after=4), tmp_path / "split", progress=False)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    assert records(tmp_path / "split", "val") == vals
    assert (tmp_path / "straight" / "curves.png").stat().st_size > 0
    no_val = train(config(store, max_steps=1, val_split="test"), tmp_path / "none", progress=False)
    assert no_val["val_loss"] is None and not records(tmp_path / "none", "val")


def test_monitor_recon_logs_training_batches_and_a_step_0_record_and_changes_nothing(store, tmp_path):
    cfg = config(store, "distill", max_steps=4, monitor_recon=True, val_split="test")  # no such split
    train(cfg, tmp_path / "train-only", progress=False)
    steps, epochs = records(tmp_path / "train-only", "step"), records(tmp_path / "train-only", "epoch")
    [untrained] = records(tmp_path / "train-only", "monitor")
    assert (untrained["epoch"], untrained["step"], untrained["samples"]) == (
        0,
        0,
        4,
    ) and "val_monitor_recon" not in untrained
    assert all(r["monitor_recon"] > 0 for r in steps) and len({r["monitor_recon"] for r in steps}) == len(steps)
    assert untrained["monitor_recon"] == steps[0]["monitor_recon"]  # measured before the first update
    assert epochs[0]["monitor_recon"] == pytest.approx(np.mean([r["monitor_recon"] for r in steps if r["epoch"] == 0]))
    # the probe changes nothing the run computes
    train(dataclasses.replace(cfg, monitor_recon=False), tmp_path / "plain", progress=False)
    assert [r["loss"] for r in records(tmp_path / "plain", "step")] == [r["loss"] for r in steps]
    assert not records(tmp_path / "plain", "monitor")
    # with a held-out split the step-0 record holds its value too, and a resume keeps the record
    held = dataclasses.replace(cfg, val_split="val", val_max_samples=5)
    train(dataclasses.replace(held, stop_after=2), tmp_path / "held", progress=False)
    train(held, tmp_path / "held", resume=True, progress=False)
    [untrained] = records(tmp_path / "held", "monitor")
    assert untrained["val_monitor_recon"] > 0 and untrained["val_samples"] == 5
    assert [r["monitor_recon"] for r in records(tmp_path / "held", "step")] == [r["monitor_recon"] for r in steps]


def test_no_keep_optimizer_shrinks_the_final_checkpoint_and_export_still_works(store, tmp_path):
    train(config(store, max_steps=2), tmp_path / "kept", progress=False)
    train(config(store, max_steps=2, keep_optimizer=False), tmp_path / "lean", progress=False)
    assert "optimizer" not in load_checkpoint(tmp_path / "lean" / LAST)
    assert (tmp_path / "lean" / LAST).stat().st_size < 0.6 * (tmp_path / "kept" / LAST).stat().st_size
    assert export_encoder(tmp_path / "lean", tmp_path / "enc.pth").is_file()
    assert (
        train(config(store, max_steps=2, keep_optimizer=False), tmp_path / "lean", resume=True, progress=False)["steps"]
        == 2
    )  # finished: nothing to do
    train(config(store, max_steps=4, stop_after=1, keep_optimizer=False), tmp_path / "paused", progress=False)
    assert "optimizer" in load_checkpoint(tmp_path / "paused" / LAST)  # unfinished runs stay resumable


@pytest.mark.slow  # ablate --resume itself: test_ablate_reads_out_every_variant_resumes_and_adds_rows
def test_resume_takes_the_runs_own_settings_and_refuses_other_ones(store, tmp_path):
    run = tmp_path / "run"
    done = pkd_train(
        "distill",
        store,
        *TINY_CLI,
        "--max-steps",
        3,
        "--stop-after",
        1,
        "--lr",
        "0.002",
        "--run-dir",
        run,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    refused = pkd_train("distill", store, "--run-dir", run, "--resume", "--lr", "0.5", "--dim", "48", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--lr 0.5 (the run has 0.002)" in refused.stderr and "--dim" not in refused.stderr
    done = pkd_train(
        "distill", store, "--run-dir", run, "--resume", "--device", "cpu", "--loader-workers", "1", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "3 of 3 steps" in done.stdout
    assert load_checkpoint(run / LAST)["position"]["step"] == 3


# ---- ablate ------------------------------------------------------------------------------------------------


def modelnet_readout(kind: str, tmp_path: Path, **options) -> Readout:
    """A ``kind`` readout on the real ModelNet40 fixture (skips when it is absent): 128 of 300 pooled points."""
    root = require_fixture("modelnet40")
    return Readout(
        kind,
        str(root / "modelnet40_normal_resampled"),
        str(root / "splits"),
        allow_missing=True,
        cache_dir=str(tmp_path / "cache"),
        pool_points=300,
        num_points=128,
        **options,
    )


def test_ablate_reads_out_every_variant_resumes_and_adds_rows(store, tmp_path):
    readout = modelnet_readout("probe", tmp_path)
    base = config(store, max_steps=2)
    out = tmp_path / "ablate-t"
    rows = run_ablation(base, ["distill", "recon"], [0, 1], out, readout, progress=False)
    assert [(r["variant"], r["seed"]) for r in rows] == [("distill", 0), ("distill", 1), ("recon", 0), ("recon", 1)]
    assert all(r["steps"] == 2 and 0 <= r["probe_oa"] <= 100 and r["val_loss"] > 0 for r in rows)
    assert [r["objective"] for r in rows[::2]] == ["prefix MSE", "Chamfer-L2"]
    assert all(
        (out / f"{v}-seed{s}" / "probe" / "results.json").is_file() for v in ("distill", "recon") for s in (0, 1)
    )
    with pytest.raises(ConfigError, match="holds an ablation already"):
        run_ablation(base, ["distill"], [0], out, readout, progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(lr\)"):
        run_ablation(dataclasses.replace(base, lr=0.5), ["distill"], [0], out, readout, resume=True, progress=False)

    # an interrupted readout, then a call with another variant: the first rows stay, only the missing work runs
    table = json.loads((out / "table.json").read_text())
    table["rows"][1]["probe_oa"] = None
    (out / "table.json").write_text(json.dumps(table))
    trained = (out / "distill-seed0" / LAST).stat().st_mtime_ns
    rows = run_ablation(base, ["no-concept", "distill"], [0, 1], out, readout, resume=True, progress=False)
    assert [(r["variant"], r["seed"]) for r in rows][-2:] == [("no-concept", 0), ("no-concept", 1)]
    assert len(rows) == 6 and all(r["probe_oa"] is not None for r in rows)
    assert (out / "distill-seed0" / LAST).stat().st_mtime_ns == trained
    markdown = (out / "table.md").read_text()
    assert "| distill | prefix MSE | 2 |" in markdown and " ± " in markdown
    assert (out / "table.png").stat().st_size > 0


def test_ablate_finetune_readout_adds_scratch_rows(store, tmp_path):
    readout = modelnet_readout("finetune", tmp_path, epochs=1, batch_size=4)
    rows = run_ablation(config(store, max_steps=1), ["distill"], [0], tmp_path / "ft", readout, progress=False)
    assert [(r["variant"], r["objective"], r["steps"]) for r in rows] == [
        ("distill", "prefix MSE", 1),
        ("scratch", None, None),
    ]
    assert all(0 <= r["finetune_oa"] <= 100 and r["probe_oa"] is None for r in rows)
    assert (tmp_path / "ft" / "scratch-seed0" / "finetune" / "results.json").is_file()


def test_ablate_cli_options_and_refusals(store, tmp_path):
    help_text = pkd_train("ablate", "--help", cwd=tmp_path).stdout
    for option in (
        "--grad-accum",
        "--weight-decay",
        "--drop-path",
        "--init",
        "--amp",
        "--min-lr",
        "--num-concepts",
        "--mask-ratio",
        "--head",
        "--decoder-depth",
        "--val-every",
        "--seeds",
        "--eval-data",
    ):
        assert option in help_text, option
    refused = pkd_train("ablate", store, *TINY_CLI, "--max-steps", 1, "--name", "x", cwd=tmp_path)
    assert refused.returncode == 2 and "--eval-data" in refused.stderr and not (tmp_path / "runs").exists()
    done = pkd_train(
        "ablate",
        store,
        *TINY_CLI,
        "--max-steps",
        1,
        "--name",
        "x",
        "--eval",
        "none",
        "--variants",
        "distill",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "runs" / "ablate-x" / "table.json").read_text())["rows"]
    assert [(r["variant"], r["seed"], r["steps"], r["probe_oa"]) for r in rows] == [("distill", 0, 1, None)]
    again = pkd_train("ablate", store, "--name", "x", "--eval", "none", "--variants", "distill", cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = pkd_train(
        "ablate", store, "--name", "x", "--eval", "none", "--variants", "distill,recon", "--resume", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = json.loads((tmp_path / "runs" / "ablate-x" / "table.json").read_text())["rows"]
    assert [(r["variant"], r["steps"]) for r in rows] == [("distill", 1), ("recon", 1)]
    assert np.isfinite(rows[1]["train_loss"])


# ---- ablate: --paper, inputs checked before the first pre-training, failed rows (issues 23 and 25) ---------


def modelnet_copy(tmp_path: Path, lists: bool = True) -> Path:
    """The ModelNet40 fixture as symlinks under ``tmp_path/mn40`` (each shape file its own link, so a test can
    replace one), with the split lists beside the classes or (``lists`` False) none at all."""
    root = require_fixture("modelnet40")
    out = tmp_path / "mn40"
    for shape in sorted((root / "modelnet40_normal_resampled").glob("*/*.txt")):
        (out / shape.parent.name).mkdir(parents=True, exist_ok=True)
        (out / shape.parent.name / shape.name).symlink_to(shape)
    if lists:
        for name in ("modelnet40_shape_names.txt", "modelnet40_train.txt", "modelnet40_test.txt"):
            (out / name).symlink_to(root / "splits" / name)
    return out


def shape_file(data: Path, shape: str) -> Path:
    return data / shape.rsplit("_", 1)[0] / f"{shape}.txt"


def present_shapes(data: Path, split: str) -> list[str]:
    """The shapes of ``split``'s list that exist under ``data``, in list order (what a readout uses)."""
    return [s for s in (data / f"modelnet40_{split}.txt").read_text().split() if shape_file(data, s).exists()]


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.pt"))


@pytest.fixture(scope="module")
def train_only_store(tmp_path_factory):
    """A store with patch tokens and no val split."""
    return make_store(tmp_path_factory.mktemp("abl-noval") / "pairs.zarr", n=8, num_points=160, shard_size=4)


@pytest.fixture(scope="module")
def tokenless_store(tmp_path_factory):
    """A store with a val split and no patch tokens."""
    path = tmp_path_factory.mktemp("abl-notok") / "pairs.zarr"
    make_store(path, n=8, num_points=160, shard_size=4, patch_tokens=False)
    return make_store(path, n=4, num_points=160, shard_size=4, seed=1, split="val", add_split=True, patch_tokens=False)


@pytest.mark.parametrize(
    "case",
    ["no split lists", "a bad sampled file", "no val split", "no patch tokens", "missing --init", "--out under a file"],
)
def test_ablate_refuses_bad_input_with_exit_2_before_any_pretraining(
    case, store, train_only_store, tokenless_store, tmp_path
):
    data = modelnet_copy(tmp_path, lists=case != "no split lists")
    args: list = [store, *TINY_CLI, "--max-steps", 1, "--name", "x", "--eval-data", data, "--allow-missing"]
    named = {"no split lists": [data / "modelnet40_shape_names.txt", "--eval-splits"]}
    if case == "no split lists":
        args += ["--variants", "distill,no-concept", "--eval", "probe"]
    elif case == "a bad sampled file":
        bad = shape_file(data, present_shapes(data, "train")[0])  # the first shape present is always sampled
        bad.unlink()
        bad.write_text("not,a,point\n")
        args += ["--variants", "distill"]
        named[case] = [bad]
    elif case == "no val split":
        args[0] = train_only_store
        args += ["--paper"]
        named[case] = [train_only_store, "'val'", "--split all"]
    elif case == "no patch tokens":
        args[0] = tokenless_store
        args += ["--paper"]
        named[case] = ["variant local", "patch_tokens", "--patch-tokens"]
    elif case == "missing --init":
        args += ["--variants", "distill", "--init", tmp_path / "nowhere.pth"]
        named[case] = [tmp_path / "nowhere.pth", "--init"]
    else:
        (tmp_path / "a-file").write_text("")
        args += ["--variants", "distill", "--out", tmp_path / "a-file" / "ablation"]
        named[case] = [tmp_path / "a-file", "--out"]
    refused = pkd_train("ablate", *args, cwd=tmp_path)
    assert refused.returncode == 2, (refused.returncode, refused.stderr[-2000:])
    assert "Traceback" not in refused.stderr and refused.stderr.startswith("error: ")
    assert len(refused.stderr.strip().splitlines()) == 1  # one paragraph
    for text in named[case]:
        assert str(text) in refused.stderr, (text, refused.stderr)
    assert not checkpoints(tmp_path) and not list(tmp_path.rglob("table.json"))  # nothing trained or written


@pytest.mark.slow  # every variant's readout: test_ablate_reads_out_every_variant_resumes_and_adds_rows
def test_ablate_paper_runs_every_row_of_tables_5_and_6_with_the_fine_tune_readout(store, tmp_path):
    from pkd.train.ablate import PAPER_VARIANTS

    # the command: --paper is the fine-tune readout (it asks for its data) and takes no other --variants or --eval
    refused = pkd_train("ablate", store, "--paper", *TINY_CLI, cwd=tmp_path)
    assert refused.returncode == 2 and "--eval finetune reads ModelNet40" in refused.stderr
    refused = pkd_train("ablate", store, "--paper", "--variants", "distill", cwd=tmp_path)
    assert refused.returncode == 2 and "--paper" in refused.stderr and not (tmp_path / "runs").exists()
    # the rows (in Python, with the readout's FPS pools made small for the test)
    out = tmp_path / "ablate-p"
    readout = modelnet_readout("finetune", tmp_path, epochs=1, batch_size=4)
    rows = run_ablation(
        config(store, max_steps=1), list(PAPER_VARIANTS), [0], out, readout, progress=False, require_val=True
    )
    assert [r["variant"] for r in rows] == [
        "scratch", "no-concept", "clip-target", "local", "distill", "recon", "recon+distill"
    ]  # fmt: skip
    assert all(r["status"] == "done" and 0 <= r["finetune_oa"] <= 100 and r["probe_oa"] is None for r in rows)
    assert [r["steps"] for r in rows] == [None] + [1] * 6 and all(r["val_loss"] > 0 for r in rows[1:])
    for r in rows:
        readout_cfg = json.loads((Path(r["run_dir"]) / "finetune" / "config.json").read_text())["config"]
        assert readout_cfg["votes"] == 0 and readout_cfg["epochs"] == 1  # the paper's ablations do not vote
        encoder = "scratch" if r["variant"] == "scratch" else str(Path(r["run_dir"]) / "encoder.pth")
        assert readout_cfg["init"] == encoder
    markdown = (out / "table.md").read_text()
    local = next(r for r in rows if r["variant"] == "local")["finetune_oa"]
    assert f"| Direct Local Alignment | local | 91.65 | {local:.4g} ± 0 | 1 |" in markdown
    assert "| Reconstruction + Distillation | recon+distill | 92.42 |" in markdown


@pytest.mark.slow
def test_a_readout_that_fails_mid_run_marks_its_row_and_resume_retries_only_the_readout(store, tmp_path):
    from pkd.train.downstream.modelnet import sample_shapes

    data = modelnet_copy(tmp_path)
    present = present_shapes(data, "train")
    bad = shape_file(data, next(s for s in present if s not in sample_shapes(present, 4)))  # not checked up front
    good = bad.resolve()
    bad.unlink()
    bad.write_text("not,a,point\n")
    args = [
        "ablate", store, *TINY_CLI, "--max-steps", 1, "--name", "f", "--variants", "distill", "--eval", "probe",
        "--eval-data", data, "--allow-missing", "--eval-cache-dir", tmp_path / "cache",
    ]  # fmt: skip
    failed = pkd_train(*args, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr and "1 of 1 rows failed" in failed.stderr and str(bad) in failed.stderr
    out = tmp_path / "runs" / "ablate-f"
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["status"] == "failed" and row["error"].startswith("probe readout failed") and str(bad) in row["error"]
    assert row["steps"] == 1 and row["probe_oa"] is None
    assert "| failed |" in (out / "table.md").read_text() and str(bad) in (out / "table.md").read_text()
    trained = (out / "distill-seed0" / LAST).stat().st_mtime_ns

    bad.unlink()
    bad.symlink_to(good)
    resumed = pkd_train(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["status"] == "done" and row["error"] is None and 0 <= row["probe_oa"] <= 100 and row["steps"] == 1
    assert (out / "distill-seed0" / LAST).stat().st_mtime_ns == trained  # the finished encoder was not retrained
    assert len(records(out / "distill-seed0", "step")) == 1


def test_rows_of_tables_written_before_row_status_read_with_one():
    from pkd.train import table

    old_columns = [c for c in table.COLUMNS if c != "status"]
    done = {**dict.fromkeys(old_columns), "variant": "distill", "seed": 0, "wall_s": 1.0, "run_dir": "r", "steps": 2}
    failed = {**done, "variant": "local", "steps": None, "error": "runs/x/train has no array 'patch_tokens'"}
    rows = [table.upgrade_row(r) for r in (done, failed)]
    assert [(r["status"], r["error"]) for r in rows] == [(None, None), ("failed", failed["error"])]
    assert all(set(table.COLUMNS) <= set(r) for r in rows)
    lines = table.markdown(rows).splitlines()
    assert (
        lines[3].startswith("| local | 0 |") and "| failed | r | runs/x/train has no array 'patch_tokens' |" in lines[3]
    )
    assert not table.paper_tables(rows)  # no fine-tune readout: no paper tables
