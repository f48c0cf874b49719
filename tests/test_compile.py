"""The fast GPU step's parts, proven on CPU: FPS without host syncs picks the same centres, a compiled step
computes what the eager one does, ``--compile`` is recorded and refused clearly where it cannot run, and
reading the loss back every N steps logs the same records.

Inductor's C++ build takes minutes on this CPU, so the step equivalence uses the ``aot_eager`` backend (the
same dynamo graph and AOTAutograd backward, eager kernels); the inductor check of FPS is ``slow``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pkd.common.errors import ConfigError, TrainingError
from pkd.train import compiled, trainer
from pkd.train.losses import LossSettings, compute_loss
from pkd.train.model import Student, StudentConfig
from pkd.train.tokenizer import farthest_point_sample
from pkd.train.trainer import recorded_config, train

from _cli import TINY_STUDENT, run_script
from store_factory import clipcap_target_shape, make_store
from store_factory import tiny_config as config


def reference_fps(xyz: torch.Tensor, num: int) -> torch.Tensor:
    """FPS as pkd computed it before (one indexed write and a fancy-indexed centre per iteration): the oracle."""
    batch, num_points, _ = xyz.shape
    rows = torch.arange(batch)
    chosen = torch.empty(batch, num, dtype=torch.long)
    nearest = torch.full((batch, num_points), float("inf"), dtype=xyz.dtype)
    farthest = torch.zeros(batch, dtype=torch.long)
    for i in range(num):
        chosen[:, i] = farthest
        nearest = torch.minimum(nearest, ((xyz - xyz[rows, farthest].unsqueeze(1)) ** 2).sum(-1))
        farthest = nearest.argmax(-1)
    return chosen


def clouds() -> torch.Tensor:
    """Random clouds, one of them on an integer grid with duplicated points (ties in every argmax)."""
    g = torch.Generator().manual_seed(0)
    xyz = torch.randn(3, 300, 3, generator=g)
    xyz[0] = torch.randint(0, 4, (300, 3), generator=g).float()
    return xyz


@pytest.mark.parametrize("num", [1, 2, 17, 64])
def test_fps_picks_the_centres_the_previous_loop_picked(num):
    xyz = clouds()
    assert torch.equal(farthest_point_sample(xyz, num), reference_fps(xyz, num))


@pytest.mark.slow
def test_fps_compiled_by_inductor_picks_the_same_centres():
    xyz = clouds()
    fps = torch.compile(farthest_point_sample, dynamic=False)
    assert torch.equal(fps(xyz, 16), reference_fps(xyz, 16))


def batch_of(cfg: StudentConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "points": torch.randn(4, cfg.num_points, 3, generator=g),
        "prefix": torch.randn(4, 10, 768, generator=g),
    }


def step(model: torch.nn.Module, student: Student, cfg: StudentConfig) -> tuple[torch.Tensor, dict]:
    """Loss, parts and gradients of one training step of ``student`` through ``model`` (it or it compiled)."""
    torch.manual_seed(3)  # drop-path draws from torch's RNG
    loss, parts = compute_loss(model, batch_of(cfg), LossSettings.of(cfg), torch.Generator().manual_seed(2))
    student.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), {"parts": parts, "grads": grads, "bn": student.MAE_encoder.encoder.first_conv[1].running_mean}


@pytest.mark.parametrize("variant", ["distill", "recon"])
def test_a_compiled_step_computes_the_eager_loss_and_gradients(variant):
    cfg = StudentConfig(**TINY_STUDENT, variant=variant, drop_path=0.1, target_shape=clipcap_target_shape(variant))
    torch.manual_seed(0)
    eager_model = Student(cfg).train()
    compiled_model = Student(cfg).train()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager_loss, eager = step(eager_model, eager_model, cfg)
    fast = compiled.compile_forward(compiled_model, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graph
        compiled_model.load_state_dict(eager_model.state_dict())
        fast_loss, fast_out = step(fast, compiled_model, cfg)
    torch.testing.assert_close(fast_loss, eager_loss, rtol=1e-4, atol=1e-6)
    assert eager["parts"].keys() == fast_out["parts"].keys()
    assert eager["grads"].keys() == fast_out["grads"].keys() and len(eager["grads"]) > 10
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(fast_out["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("compile") / "pairs.zarr", n=16, num_points=160, shard_size=4)


def test_compile_on_where_the_platform_cannot_compile_names_the_escape(store, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "cannot_compile", lambda device: "no C++ compiler (c++) on PATH")
    with pytest.raises(ConfigError, match=r"--compile on: .*no C\+\+ compiler.*pass --compile off"):
        train(config(store, compile="on", device="cpu"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--compile 'yes': choose auto, on or off"):
        config(store, compile="yes")


def test_compile_on_without_a_compiler_exits_2_through_the_console_script(store, tmp_path):
    env = {**__import__("os").environ, "CXX": "no-such-c++"}
    args = ["distill", store, "--run-dir", tmp_path / "run", "--device", "cpu", "--compile", "on"]
    done = run_script("pkd-train", *args, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert "no C++ compiler (no-such-c++)" in done.stderr and "--compile off" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_the_resolved_option_is_recorded_and_an_older_record_reads_as_eager_every_step(store, tmp_path):
    train(config(store, max_steps=1), tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["compile"] == "off" and record["config"]["log_every"] == 1  # auto on CPU
    for key in ("compile", "log_every"):
        del record["config"][key]
    for key in ("targets", "target_shape"):  # the version-3 layout, before these run options
        del record["config"]["model"][key]
    (tmp_path / "run" / "config.json").write_text(json.dumps({**record, "version": 3}))
    saved = recorded_config(tmp_path / "run")
    assert saved.compile == "off" and saved.log_every == 1


def test_a_compiled_run_trains_and_resumes_as_the_eager_run(store, tmp_path, monkeypatch):
    built = []

    def compile_forward(module):
        built.append(module)
        return compiled.compile_forward(module, backend="aot_eager")

    monkeypatch.setattr(trainer, "compile_forward", compile_forward)
    monkeypatch.setattr(compiled, "cannot_compile", lambda device: None)
    eager = train(config(store, max_steps=3), tmp_path / "eager", progress=False)
    assert not built  # auto on CPU: eager
    train(config(store, max_steps=3, stop_after=2, compile="on"), tmp_path / "fast", progress=False)
    assert len(built) == 1
    fast = train(config(store, max_steps=3, compile="off"), tmp_path / "fast", resume=True, progress=False)
    assert len(built) == 1  # a run option: the resumed launch trains eagerly
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["config"]["compile"] == "on"
    assert fast["steps"] == 3
    assert fast["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)


def steps_of(run) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records if r["kind"] == "step"]


def test_reading_the_loss_every_n_steps_logs_the_same_records(store, tmp_path, monkeypatch):
    reads = []
    real = trainer._read
    monkeypatch.setattr(trainer, "_read", lambda pending: reads.append(len(pending.steps)) or real(pending))
    cfg = config(store, max_steps=7, val_every=6)
    train(cfg, tmp_path / "every", progress=False)
    assert reads == [1] * 7
    reads.clear()
    train(dataclasses.replace(cfg, log_every=4), tmp_path / "batched", progress=False)
    assert reads == [1, 3, 2, 1]  # the first step alone, then every 4th, the held-out step 6 and the end
    every, batched = steps_of(tmp_path / "every"), steps_of(tmp_path / "batched")
    assert [r["step"] for r in batched] == list(range(1, 8))
    assert batched == every


def test_a_nan_loss_read_back_late_still_names_its_step_and_nothing_is_saved_after_it(tmp_path, monkeypatch):
    path = make_store(tmp_path / "pairs.zarr", n=16, num_points=160, shard_size=4)
    calls = {"n": 0}
    real = trainer.compute_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    with pytest.raises(TrainingError, match="at step 3"):
        train(config(path, max_steps=6, log_every=5, save_every=4), tmp_path / "run", progress=False)
    assert [r["step"] for r in steps_of(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "last.pt").exists()
