"""Trainer, loader, losses, CLI and the no-teacher rule, on tiny synthetic stores and tiny students."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

from pkd.common.errors import ConfigError, StoreError, TrainingError
from pkd.common.store import array_of, open_split, read_rows, read_shard, teacher_crop, write_shard
from pkd.train import data as data_module
from pkd.train.checkpoint import LAST, load_checkpoint
from pkd.train.data import LoaderConfig, StoreLoader, _Epoch, normalize, subsample_points, target_stats
from pkd.train.loss_terms import CropBox, local_alignment, patch_cells
from pkd.train.losses import LossSettings, compute_loss
from pkd.train.model import Student, StudentConfig
from pkd.train.trainer import TrainConfig, train
from pkd.train.variants import VARIANTS

from _cli import TINY_STUDENT as TINY
from _cli import run_script
from store_factory import clipcap_target_shape, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "pairs.zarr", n=18, num_points=160, shard_size=4, invalid=(5,))


def config(store, variant="distill", **kw) -> TrainConfig:
    model = StudentConfig(**TINY, variant=variant)
    return TrainConfig(store=str(store), model=model, epochs=3, warmup_epochs=1, batch_size=4, **kw)


# ---- loader ---------------------------------------------------------------------------------------------


def loader(store, **kw) -> StoreLoader:
    args = dict(store=str(store), split="train", arrays=("points", "prefix", "frame"), batch_size=4, num_points=160)
    return StoreLoader(LoaderConfig(**{**args, **kw}))


def frames(batches) -> list[int]:
    return [int(f) for b in batches for f in b["frame"]]


def test_loader_epoch_is_a_deterministic_shuffle_of_valid_samples(store):
    data = loader(store, shuffle_shards=2)
    assert data.steps_per_epoch == 17 // 4
    epoch0 = frames(data.epoch(0))
    assert len(epoch0) == 16 and len(set(epoch0)) == 16 and 5 not in epoch0
    assert epoch0 == frames(loader(store, shuffle_shards=2).epoch(0))
    assert epoch0 != frames(data.epoch(1))
    assert frames(data.epoch(0, start_batch=3)) == epoch0[12:]
    batch = next(iter(data.epoch(0)))
    assert batch["points"].dtype == torch.float32 and batch["prefix"].shape == (4, 10, 768)
    assert batch["prefix"].dtype == torch.float32


def test_loader_workers_give_the_same_batches(store):
    plain = list(loader(store, shuffle_shards=1).epoch(2, start_batch=1))
    data = loader(store, shuffle_shards=1)
    data.num_workers = 2
    for a, b in zip(plain, data.epoch(2, start_batch=1), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_ranks_take_disjoint_whole_shards(store):
    seen = []
    for rank in range(2):
        data = loader(store, rank=rank, world_size=2, batch_size=2)
        layout = _Epoch(data.cfg, data.shards, data.valid, 0)
        shards = {int(s) for w in layout.windows for s in w}
        got = frames(data.epoch(0))
        assert {f // 4 for f in got} <= shards
        seen.append(set(got))
    assert not seen[0] & seen[1]


def test_loader_subsamples_points_deterministically(store):
    a = next(iter(loader(store, num_points=64).epoch(0)))
    b = next(iter(loader(store, num_points=64).epoch(0)))
    assert a["points"].shape == (4, 64, 3) and torch.equal(a["points"], b["points"])


def test_fps_subsampling_keeps_the_farthest_point_subset_in_every_epoch(store):
    from pkd.common.geometry import farthest_points
    from pkd.train.data import subsample_points

    rng = np.random.default_rng(0)
    points = rng.normal(size=(3, 160, 3)).astype(np.float32)
    arrays = {"points": points, "colors": np.arange(3 * 160 * 3).reshape(3, 160, 3), "prefix": np.ones((3, 10))}
    a = subsample_points(arrays, 40, np.random.default_rng(1), "fps")
    b = subsample_points(arrays, 40, np.random.default_rng(2), "fps")
    for i in range(3):
        keep = np.sort(farthest_points(points[i], 40))
        np.testing.assert_array_equal(a["points"][i], points[i][keep])
        np.testing.assert_array_equal(a["colors"][i], arrays["colors"][i][keep])
        dist = np.linalg.norm(points[i][:, None] - a["points"][i][None], axis=-1).min(1)
        drawn = subsample_points(arrays, 40, np.random.default_rng(i), "random")["points"][i]
        assert dist.max() < np.linalg.norm(points[i][:, None] - drawn[None], axis=-1).min(1).max()  # even cover
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["prefix"] is arrays["prefix"]
    by_frame = [
        {
            int(f): p
            for batch in loader(store, num_points=64, subsample=s).epoch(e)
            for f, p in zip(batch["frame"], batch["points"])
        }
        for s in ("fps", "random")
        for e in (0, 1)
    ]
    both = sorted(set(by_frame[0]) & set(by_frame[1]))
    assert len(both) >= 15 and all(torch.equal(by_frame[0][f], by_frame[1][f]) for f in both)  # fps: every epoch alike
    assert not any(torch.equal(by_frame[2][f], by_frame[3][f]) for f in both)  # random: a fresh draw each epoch


def test_read_rows_decodes_what_zarr_reads_into_the_given_places(store):
    group = open_split(store, "train")
    rng = np.random.default_rng(0)
    for name in ("points", "colors", "pixels", "in_view", "prefix", "valid", "frame"):
        array = array_of(group, name)
        for start in range(0, 18, 4):
            stop = min(start + 4, 18)
            rows = rng.permutation(stop - start)[: rng.integers(1, stop - start + 1)]
            dest = rng.permutation(6)[: len(rows)]
            out = np.zeros((6, *array.shape[1:]), array.dtype)
            read_rows(array, start, stop, rows, out, dest)
            expected = np.zeros_like(out)
            expected[dest] = read_shard(group, name, start, stop)[rows]
            assert np.array_equal(out, expected), (name, start)


def test_read_rows_reads_other_layouts_through_zarr(tmp_path):
    values = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    array = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(8, 3), chunks=(2, 3), dtype="float32")
    array[:] = values
    out = np.zeros((3, 3), np.float32)
    read_rows(array, 4, 8, np.array([3, 0]), out, np.array([0, 2]))
    assert np.array_equal(out, np.stack([values[7], np.zeros(3), values[4]]))


def test_read_rows_refuses_a_corrupt_shard_index(store, tmp_path):
    import shutil

    copy = tmp_path / "pairs.zarr"
    shutil.copytree(store, copy)
    victim = copy / "train" / "points" / "c" / "1" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    array = array_of(open_split(copy, "train"), "points")
    with pytest.raises(StoreError, match=r"points: shard 1 \(samples 4-7\) is corrupt .*index fails its CRC32C"):
        read_rows(array, 4, 8, np.arange(4), np.zeros((4, 160, 3), np.float32), np.arange(4))


def _reference_window(self, w: int) -> dict[str, np.ndarray]:
    """The loader's window as first written: whole shards through zarr, valid rows concatenated, permuted."""
    group = open_split(self.cfg.store, self.cfg.split)
    ranges = [self.shards[s] for s in self.epoch.windows[w]]
    valid = [read_shard(group, "valid", a, b).astype(bool) for a, b in ranges]
    rng = self.epoch.rng(w)
    perm = rng.permutation(sum(int(v.sum()) for v in valid))
    out = {}
    for name in self.cfg.arrays:
        values = np.concatenate([read_shard(group, name, a, b)[v] for (a, b), v in zip(ranges, valid)])[perm]
        out[name] = normalize(values, self.stats.get(name))
    return subsample_points(out, self.cfg.num_points, rng, self.cfg.subsample)


def test_fast_loader_gives_the_batches_of_the_reference_reading(store, monkeypatch):
    arrays = ("points", "colors", "pixels", "in_view", "prefix", "frame")
    stats = {"prefix": target_stats(open_split(store, "train"), "prefix")}
    cfg = LoaderConfig(str(store), "train", arrays, 4, 96, seed=3, shuffle_shards=2, streams=2)
    fast = {w: [b for e in (0, 1) for b in StoreLoader(cfg, w, stats).epoch(e, start_batch=e)] for w in (0, 2)}
    monkeypatch.setattr(data_module._WindowDataset, "load", _reference_window)
    reference = [b for e in (0, 1) for b in StoreLoader(cfg, 0, stats).epoch(e, start_batch=e)]
    assert len(reference) == 2 + 1
    for batches in fast.values():
        for a, b in zip(batches, reference, strict=True):
            assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_target_stats_recorded_or_computed(tmp_path, store):
    from pkd.common.store import open_split

    recorded = target_stats(open_split(store, "train"), "prefix")
    computed = target_stats(
        open_split(
            make_store(tmp_path / "s.zarr", n=18, num_points=160, shard_size=4, invalid=(5,), stats=False), "train"
        ),
        "prefix",
    )
    assert recorded[0].shape == (10, 768)
    np.testing.assert_allclose(recorded[0], computed[0], atol=1e-4)
    np.testing.assert_allclose(recorded[1], computed[1], rtol=1e-3, atol=1e-4)


# ---- losses and model -----------------------------------------------------------------------------------


def test_patch_cells_follow_the_teacher_crop(tmp_path):
    path = make_store(tmp_path / "portrait.zarr", n=2, num_points=64, color_size=(480, 640))
    crop = CropBox(*teacher_crop(path, "train"))  # portrait: the crop spans the full width, rows ~79.5..560.5
    assert (crop.u0, crop.u1) == (0, 480) and crop.v0 == pytest.approx(79.46, abs=0.01)
    cells, inside = patch_cells(torch.tensor([[0, 80], [479, 559], [10, 78], [240, 320]]), crop, 7)
    assert cells[:2].tolist() == [0, 48] and cells[3] == 3 * 7 + 3
    assert inside.tolist() == [True, True, False, True]


def test_local_alignment_pairs_each_teacher_patch_with_the_nearest_projected_centre():
    """Paper §4.3.1: each 2D patch meets the 3D patch whose centre projects nearest; ``centre`` is the reverse."""
    crop = CropBox(0, 0, 70, 70)  # 7×7 patches of 10 px: patch (row r, col c) is centred at (10c + 4.5, 10r + 4.5)
    tokens = torch.eye(49).unsqueeze(0)  # teacher patch p's token is the unit vector e_p
    pixels = torch.tensor([[[4, 4], [64, 64], [30, 30]]])  # centres in patches 0, 48 and 24
    in_view = torch.tensor([[True, True, False]])  # the third centre lies outside the crop's view
    pred = torch.stack([tokens[0, 0], tokens[0, 48], tokens[0, 24]]).unsqueeze(0)  # each centre predicts its patch
    # centre → patch: both visible centres predict their own patch exactly
    assert float(local_alignment(pred, tokens, pixels, in_view, crop, "centre")) == pytest.approx(0.0)
    # patch → centre: patch p meets centre 0 when p's centre is nearer to (4, 4) than to (64, 64), else centre 1;
    # the pair is exact only for patches 0 and 48, every other pair is orthogonal (1 − cos = 1)
    assert float(local_alignment(pred, tokens, pixels, in_view, crop, "patch")) == pytest.approx(47 / 49)
    nearer_first = [p for p in range(49) if (p % 7 + p // 7) < 6]  # patches nearer to centre 0 than centre 1
    target = torch.zeros(1, 49, 49)
    target[0, nearer_first, 0] = 1.0
    target[0, [p for p in range(49) if p not in nearer_first], 48] = 1.0
    assert float(local_alignment(pred, target, pixels, in_view, crop, "patch")) == pytest.approx(0.0, abs=1e-6)
    # a batch item without a visible centre adds nothing
    assert float(local_alignment(pred, tokens, pixels, torch.zeros(1, 3, dtype=torch.bool), crop)) == 0.0


def test_one_optimisation_step_lowers_the_loss(store):
    torch.manual_seed(0)
    cfg = StudentConfig(**{**TINY, "drop_path": 0.0}, target_shape=clipcap_target_shape("distill"))
    model = Student(cfg)
    batch = next(iter(loader(store, num_points=128, arrays=("points", "prefix")).epoch(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before, _ = compute_loss(model, batch, LossSettings.of(cfg))
    before.backward()
    opt.step()
    after, _ = compute_loss(model, batch, LossSettings.of(cfg))
    assert float(after.detach()) < float(before.detach())


# ---- trainer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_two_steps(store, tmp_path, variant):
    summary = train(
        config(store, variant, max_steps=2, normalize_targets=variant != "local"), tmp_path / "run", progress=False
    )
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["model"]["variant"] == variant
    assert record["store"]["teacher"]["random"] is True and record["code"]["pkd"]
    assert record["config"]["augment"]["scale_low"] == pytest.approx(2 / 3)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1, 2]
    assert (tmp_path / "run" / "curves.png").exists()


def test_resume_is_bit_identical(store, tmp_path):
    cfg = config(store, "recon+distill", max_steps=6)
    train(cfg, tmp_path / "straight", progress=False)
    train(dataclasses.replace(cfg, stop_after=3), tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split" / LAST)["position"] == {"step": 3, "epoch": 0, "batch": 3}
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / LAST)
    b = load_checkpoint(tmp_path / "split" / LAST)
    assert a["position"] == b["position"] == {"step": 6, "epoch": 1, "batch": 2}
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # 4 steps per epoch, then the epoch record at step 4


def test_save_every_and_killed_process_leaves_a_loadable_checkpoint(store, tmp_path):
    """A run killed mid-training resumes from its last complete checkpoint (no temp file is ever read)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import pkd.train.trainer as t
        from pkd.train.model import StudentConfig
        real = t.save
        def save_then_die(run_dir, cfg, model, optimizer, pos):
            real(run_dir, cfg, model, optimizer, pos)
            if pos.step == 2:
                os._exit(9)
        t.save = save_then_die
        cfg = t.TrainConfig(store={str(store)!r}, model=StudentConfig(**{TINY!r}), epochs=3, warmup_epochs=1,
                            batch_size=4, max_steps=5, save_every=1)
        t.train(cfg, {str(tmp_path / "run")!r}, progress=False)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert load_checkpoint(tmp_path / "run" / LAST)["position"]["step"] == 2
    summary = train(config(store, max_steps=5, save_every=1), tmp_path / "run", resume=True, progress=False)
    assert summary["steps"] == 5


def test_existing_run_dir_is_never_overwritten_silently(store, tmp_path):
    train(config(store, max_steps=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        train(config(store, max_steps=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="different settings.*lr"):
        train(config(store, max_steps=2, lr=0.5), tmp_path / "run", resume=True, progress=False)
    assert train(config(store, max_steps=1), tmp_path / "run", overwrite=True, progress=False)["steps"] == 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a pkd-train run"):
        train(config(store, max_steps=1), tmp_path / "notes", overwrite=True, progress=False)
    assert (tmp_path / "notes" / "keep.txt").exists()


def test_init_from_exported_encoder(store, tmp_path):
    from pkd.train.export import export_encoder

    train(config(store, max_steps=1), tmp_path / "a", progress=False)
    encoder = export_encoder(tmp_path / "a", tmp_path / "enc.pth")
    assert (
        train(config(store, "no-concept", max_steps=1, init=str(encoder)), tmp_path / "b", progress=False)["steps"] == 1
    )
    torch.save({"model": {"fc.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="no Point-MAE encoder weights"):
        train(config(store, max_steps=1, init=str(tmp_path / "foreign.pth")), tmp_path / "c", progress=False)


def test_store_errors_name_the_fix(tmp_path, store):
    bare = make_store(tmp_path / "bare.zarr", n=8, num_points=160, shard_size=4, patch_tokens=False)
    with pytest.raises(StoreError, match="prep with --patch-tokens"):
        train(config(bare, "local", max_steps=1), tmp_path / "a", progress=False)
    no_size = make_store(tmp_path / "nosize.zarr", n=8, num_points=160, shard_size=4, color_size=None)
    with pytest.raises(StoreError, match="color_size"):
        train(config(no_size, "local", max_steps=1), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="batch size 64 is larger than the 17 valid samples"):
        train(dataclasses.replace(config(store), batch_size=64), tmp_path / "c", progress=False)
    with pytest.raises(StoreError, match="no pair store"):
        train(config(tmp_path / "missing.zarr"), tmp_path / "d", progress=False)
    assert not (tmp_path / "c").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    path = make_store(tmp_path / "poison.zarr", n=16, num_points=160, shard_size=4)
    cfg = dataclasses.replace(config(path, max_steps=4, save_every=1), shuffle_shards=1)
    data = loader(path, shuffle_shards=1)
    poisoned = int(_Epoch(data.cfg, data.shards, data.valid, 0).windows[2][0])
    from pkd.common.store import open_store

    group = open_store(path, mode="r+")["train"]
    prefix = np.full((4, 10, 768), np.nan, dtype=np.float16)
    write_shard(group, poisoned, "teacher", {"prefix": prefix, "clip_embed": np.zeros((4, 512), np.float16)})
    with pytest.raises(TrainingError, match="at step 3"):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / LAST)
    assert ckpt["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- CLI and import rule --------------------------------------------------------------------------------


def cli(*args, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run pkd-train's main() in-process (as the console script does): exit code, stdout, stderr."""
    from pkd.train.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["pkd-train", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = [
    "--num-points",
    128,
    "--num-group",
    16,
    "--group-size",
    8,
    "--dim",
    48,
    "--depth",
    2,
    "--heads",
    4,
    "--batch-size",
    4,
    "--device",
    "cpu",
]


def test_cli_distill_export_ablate_and_errors(store, tmp_path, monkeypatch, capsys):
    def run(*args):
        return cli(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)

    code, _, err = run("distill", store, *SMALL, "--max-steps", 1, "--run-dir", "runs/a")
    assert code == 0, err
    code, _, err = run("distill", store, *SMALL, "--max-steps", 1, "--run-dir", "runs/a")
    assert code == 2 and err.startswith("error: run directory") and "Traceback" not in err
    code, _, err = run("export", "runs/a", "--out", "enc.pth")
    assert code == 0, err
    weights = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert list(weights) == ["base_model", "pkd"] and "MAE_encoder.norm.weight" in weights["base_model"]
    assert weights["pkd"]["store"] == str(store) and "random" in weights["pkd"]["teacher"]  # the store's teacher
    assert all(k.startswith("MAE_encoder.") for k in weights["base_model"])
    code, _, err = run(
        "ablate", store, *SMALL, "--variants", "distill,no-concept", "--max-steps", 1, "--name", "t", "--eval", "none"
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "runs" / "ablate-t" / "table.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["distill", "no-concept"] and all(r["steps"] == 1 for r in rows)
    assert "| distill |" in (tmp_path / "runs" / "ablate-t" / "table.md").read_text()
    assert "Train one student" in run("distill", "--help")[1]


def test_python_m_entry_point_reports_errors_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pkd.train", "distill", tmp_path / "missing.zarr"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("error: no pair store") and "Traceback" not in done.stderr


def test_training_never_imports_the_teacher(store, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import pkd.train, pkd.train.cli, pkd.train.trainer, pkd.train.export, pkd.train.ablate, pkd.train.data
        from pkd.train.model import StudentConfig
        from pkd.train.trainer import TrainConfig, train
        cfg = TrainConfig(store={str(store)!r}, model=StudentConfig(**{TINY!r}), batch_size=4, max_steps=1)
        assert train(cfg, {str(tmp_path / "run")!r}, progress=False)["steps"] == 1
        bad = [m for m in sys.modules if m.split(".")[0] in ("open_clip", "transformers")
               or m.startswith("pkd.preprocess")]
        assert not bad, bad
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unknown_local_pairing_exits_2_naming_the_choices(tmp_path):
    done = run_script("pkd-train", "distill", tmp_path / "pairs.zarr", "--local-pairing", "sideways", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown local pairing 'sideways'; choose one of patch, centre." in done.stderr
    assert not (tmp_path / "runs").exists()
