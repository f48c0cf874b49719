"""DDP training under torchrun (gloo on CPU): same global batches, same loss curve and parameters as one process,
resume across world sizes, rank 0 alone writes files. Subprocess runs use 2 processes with OMP_NUM_THREADS=1."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pkd.common.errors import ConfigError
from pkd.train.checkpoint import LAST, load_checkpoint
from pkd.train.data import LoaderConfig, StoreLoader
from pkd.train.distributed import CpuSyncBatchNorm, convert_sync_batchnorm
from pkd.train.model import StudentConfig
from pkd.train.trainer import TrainConfig, train

from _cli import flags
from store_factory import make_store

TORCHRUN = Path(sys.executable).with_name("torchrun")
MODEL_FLAGS = dict(num_points=128, num_group=16, group_size=8, dim=48, depth=2, heads=2, drop_path=0.0)
FLAGS = flags(**MODEL_FLAGS, batch_size=8, epochs=2, warmup_epochs=1, device="cpu")
EXPECTED_FILES = {"config.json", "metrics.jsonl", "curves.png", LAST}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 10 shards of 4 (one invalid sample): 2 streams of 5 shards, ≥ 19 samples each → 4 batches of 8 per epoch
    return make_store(tmp_path_factory.mktemp("ddp") / "pairs.zarr", n=40, num_points=160, shard_size=4, invalid=(5,))


def config(store, variant="recon+distill", **kw) -> TrainConfig:
    """The 1-process twin of the FLAGS runs (head_hidden and num_concepts are not CLI options: match defaults)."""
    model = StudentConfig(**MODEL_FLAGS, num_concepts=32, head_hidden=1024, variant=variant)
    return TrainConfig(store=str(store), model=model, epochs=2, warmup_epochs=1, batch_size=8, streams=2, **kw)


def run_ranks(log_dir: Path, nproc: int, *cmd, timeout: int = 120) -> tuple[int, list[dict[str, str]]]:
    """Run ``cmd`` under ``torchrun --nproc-per-node nproc`` with every rank's stdout and stderr in its own files
    (ranks sharing one pipe interleave their lines: 'okok 0 2'); returns the exit code and each rank's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [TORCHRUN, "--standalone", "--nproc-per-node", nproc, "--log-dir", log_dir, "--redirects", 3]
    done = subprocess.run([str(c) for c in [*launch, *cmd]], env=env, capture_output=True, text=True, timeout=timeout)
    (attempt,) = Path(log_dir).glob("*/attempt_0")
    outputs = [
        {name: (attempt / str(rank) / f"{name}.log").read_text() for name in ("stdout", "stderr")}
        for rank in range(nproc)
    ]
    return done.returncode, outputs


def torchrun(store, run_dir, *args, nproc=2, variant="recon+distill"):
    code, ranks = run_ranks(
        Path(run_dir).with_name(Path(run_dir).name + "-logs"),
        nproc,
        "-m",
        "pkd.train",
        "distill",
        store,
        "--variant",
        variant,
        "--run-dir",
        run_dir,
        *FLAGS,
        *args,
    )
    assert code == 0, [r["stderr"][-2000:] for r in ranks]
    return ranks


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in records(run_dir) if r["kind"] == "step"]


# Tensors whose exact gradient is zero: biases feeding a BatchNorm (it subtracts their per-channel
# offset) and the running means that track them. Their float-noise gradients are scaled up to lr-sized
# steps by Adam, so they differ between any two summation orders; nothing downstream sees them.
BN_CANCELLED = ("first_conv.0.bias", "first_conv.3.bias", "second_conv.0.bias", "running_mean")


def assert_same_params(a_dir, b_dir, rtol=5e-2, bias_rtol=0.15):
    """Same position and parameters up to float rounding (relative norm of the difference, as Adam amplifies
    the rounding of near-zero gradient entries). Biases start at zero, so after a few steps their norm is only
    those few lr-sized Adam steps and a rounding-level sign flip of one entry is a larger relative change
    (``bias_rtol``; seen: a BatchNorm shift at 0.052 when the in-process run used one thread)."""
    a, b = load_checkpoint(Path(a_dir) / LAST), load_checkpoint(Path(b_dir) / LAST)
    assert a["position"] == b["position"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        if a["model"][key].is_floating_point() and not key.endswith(BN_CANCELLED):
            diff = float((a["model"][key] - b["model"][key]).norm() / a["model"][key].norm().clamp_min(1e-12))
            assert diff < (bias_rtol if key.endswith("bias") else rtol), (key, diff)


# ---- loader and helpers (in process) --------------------------------------------------------------------


def frames(batch) -> list[int]:
    return [int(f) for f in batch["frame"]]


def loader(store, **kw) -> StoreLoader:
    args = dict(
        store=str(store),
        split="train",
        arrays=("points", "frame"),
        batch_size=8,
        num_points=160,
        shuffle_shards=2,
        streams=4,
    )
    return StoreLoader(LoaderConfig(**{**args, **kw}))


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_the_world_size(store, world):
    one = loader(store)
    ranks = [loader(store, rank=r, world_size=world) for r in range(world)]
    assert {r.steps_per_epoch for r in ranks} == {one.steps_per_epoch} and one.steps_per_epoch > 0
    chunk = 8 // 4
    for epoch in (0, 1):
        for whole, *parts in zip(one.epoch(epoch), *(r.epoch(epoch) for r in ranks), strict=True):
            # the rank-r part holds streams r, r+W, … in order; the 1-process batch holds streams 0..S-1
            by_stream = {
                s: frames(p)[i * chunk : (i + 1) * chunk]
                for r, p in zip(ranks, parts)
                for i, s in enumerate(r.cfg.own_streams)
            }
            assert frames(whole) == [f for s in range(4) for f in by_stream[s]]
    shards = [{f // 4 for b in r.epoch(0) for f in frames(b)} for r in ranks]
    assert all(not a & b for i, a in enumerate(shards) for b in shards[i + 1 :])  # whole shards, one rank each


def test_streamed_loader_resumes_mid_epoch_and_with_workers(store):
    data = loader(store, shuffle_shards=1)
    epoch = [frames(b) for b in data.epoch(1)]
    assert [frames(b) for b in data.epoch(1, start_batch=2)] == epoch[2:]
    data.num_workers = 2
    assert [frames(b) for b in data.epoch(1, start_batch=1)] == epoch[1:]


def test_world_and_batch_must_divide_evenly(store):
    with pytest.raises(ConfigError, match="cannot share 3 data streams"):
        loader(store, world_size=2, streams=3, batch_size=6)
    with pytest.raises(ConfigError, match="does not split into 4 data streams"):
        loader(store, batch_size=6)
    with pytest.raises(ConfigError, match="must be at least 1 and divide the batch size"):
        TrainConfig(store="x", batch_size=6, streams=4)


def test_cpu_sync_batchnorm_keeps_the_state_dict_and_single_process_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(10, 3)
    expected = model(x)
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CpuSyncBatchNorm) and list(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), expected)  # no process group: plain batch norm


def test_single_process_never_initialises_torch_distributed(store, tmp_path):
    assert train(config(store, "distill", max_steps=1), tmp_path / "run", progress=False)["steps"] == 1
    assert not torch.distributed.is_initialized()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["streams"] == 2


# ---- torchrun -------------------------------------------------------------------------------------------

SYNC_BN_SCRIPT = """
import copy, sys, torch
import torch.nn.functional as F
from pkd.train import distributed as D
info = D.init_from_env("cpu")
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
net = net.double()
x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
ref = copy.deepcopy(net)
F.mse_loss(ref(x), y).backward()
ddp = D.wrap_model(net, info, torch.device("cpu"))
part = slice(8 * info.rank, 8 * info.rank + 8)
F.mse_loss(ddp(x[part]), y[part]).backward()
for p, q in zip(D.unwrap(ddp).parameters(), ref.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
for name in ("running_mean", "running_var"):
    torch.testing.assert_close(getattr(D.unwrap(ddp)[1], name), getattr(ref[1], name), rtol=1e-10, atol=1e-12)
D.cleanup()
print("ok", info.rank, info.world_size)
"""


@pytest.mark.slow
def test_cpu_sync_batchnorm_under_torchrun_equals_batchnorm_of_the_global_batch(tmp_path):
    """torch.nn.SyncBatchNorm refuses CPU tensors: our gloo replacement gives the global batch's gradients."""
    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN_SCRIPT)
    code, ranks = run_ranks(tmp_path / "logs", 2, script)
    assert code == 0, [r["stderr"][-2000:] for r in ranks]
    assert [r["stdout"] for r in ranks] == ["ok 0 2\n", "ok 1 2\n"]


@pytest.mark.slow  # ranks read disjoint shards: test_train, in-process
def test_torchrun_two_processes_match_one_process(store, tmp_path):
    # gradient accumulation (DDP no_sync) and loader workers included
    torchrun(store, tmp_path / "ddp", "--save-every", 3, "--grad-accum", 2, "--loader-workers", 1)
    train(config(store, grad_accum=2), tmp_path / "one", progress=False)
    np.testing.assert_allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4)
    assert_same_params(tmp_path / "one", tmp_path / "ddp")

    # rank 0 alone wrote: each record once, no stray files, unprefixed state dict, streams recorded
    assert [(r["kind"], r["step"]) for r in records(tmp_path / "ddp")] == [
        ("step", 1),
        ("step", 2),
        ("epoch", 2),
        ("step", 3),
        ("step", 4),
        ("epoch", 4),
    ]
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == EXPECTED_FILES
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert record["config"]["streams"] == 2 and record["launch"] == {"world_size": 2}
    ckpt = load_checkpoint(tmp_path / "ddp" / LAST)
    assert not any(k.startswith("module.") for k in ckpt["model"]) and len(ckpt["rng_ranks"]) == 2


@pytest.mark.slow
def test_the_reconstruction_probe_does_not_depend_on_the_world_size(store, tmp_path):
    torchrun(store, tmp_path / "ddp", "--monitor-recon", "--max-steps", 3)
    train(config(store, monitor_recon=True, max_steps=3), tmp_path / "one", progress=False)
    probe = [[r["monitor_recon"] for r in records(tmp_path / run) if "monitor_recon" in r] for run in ("ddp", "one")]
    assert [r["kind"] for r in records(tmp_path / "ddp")][0] == "monitor" and len(probe[0]) == 4  # step 0, steps 1-3
    np.testing.assert_allclose(probe[0][:2], probe[1][:2], rtol=1e-6)  # before any update: same batches and masks
    np.testing.assert_allclose(probe[0], probe[1], rtol=1e-2)  # after: the weights agree up to float rounding
    np.testing.assert_allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4)


@pytest.mark.slow
def test_resume_across_world_sizes(store, tmp_path):
    straight = tmp_path / "straight"
    train(config(store, "recon", max_steps=6), straight, progress=False)
    # 2 processes for 3 steps, then 1 process to 6
    torchrun(store, tmp_path / "a", "--max-steps", 6, "--stop-after", 3, variant="recon")
    assert load_checkpoint(tmp_path / "a" / LAST)["position"] == {"step": 3, "epoch": 0, "batch": 3}
    summary = train(
        dataclasses.replace(config(store, "recon", max_steps=6), streams=None),
        tmp_path / "a",
        resume=True,
        progress=False,
    )
    assert summary["steps"] == 6
    assert_same_params(straight, tmp_path / "a")
    # 1 process for 5 steps (past the epoch boundary), then 2 processes to 6
    train(config(store, "recon", max_steps=6, stop_after=5), tmp_path / "b", progress=False)
    torchrun(store, tmp_path / "b", "--resume", variant="recon")
    assert_same_params(straight, tmp_path / "b")
    steps = [r["step"] for r in records(tmp_path / "b") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(straight), rtol=1e-4)


@pytest.mark.slow
def test_finetune_under_torchrun_trains_on_both_ranks_and_rank_0_writes(tmp_path):
    """ModelNet40 finetuning with 2 processes: the global batch is split, rank 0 alone writes the run."""
    from conftest import require_fixture

    root = require_fixture("modelnet40")
    run = tmp_path / "cls"
    cmd = [
        *("-m", "pkd.train", "finetune", "modelnet40"),
        *flags(data=root / "modelnet40_normal_resampled", splits=root / "splits", allow_missing=True, pool_points=300),
        *flags(num_points=128, num_group=16, dim=48, depth=3, heads=2, cache_dir=tmp_path / "cache", init="scratch"),
    ]
    code, ranks = run_ranks(
        tmp_path / "logs", 2, *cmd, *flags(run_dir=run, epochs=2, batch_size=4, device="cpu"), timeout=300
    )
    assert code == 0, [r["stderr"][-2000:] for r in ranks]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4 and len(results["history"]) == 2
    assert [r["step"] for r in records(run) if r["kind"] == "step"] == [1, 2, 3, 4]  # each step logged once
    code, ranks = run_ranks(
        tmp_path / "odd-logs",
        2,
        *cmd,
        *flags(run_dir=tmp_path / "odd", epochs=1, batch_size=3, device="cpu"),
        timeout=300,
    )
    assert code != 0  # torchrun exits 1
    assert any("error: --batch-size 3 is the global batch" in r["stderr"] for r in ranks), ranks
