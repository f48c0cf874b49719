"""Training on any target set of a store (``--targets SET/ARRAY``): shapes from the store, records, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pkd.common.errors import ConfigError
from pkd.common.store import CLIP_DIM, PATCH_TOKENS, PREFIX_SHAPE, teacher_crop
from pkd.train.ablate import run_ablation
from pkd.train.config import TrainConfig
from pkd.train.downstream.models import init_encoder
from pkd.train.encoder import PointEncoder
from pkd.train.export import export_encoder
from pkd.train.model import Student, StudentConfig
from pkd.train.trainer import open_data, recorded_config, train, with_target

from _cli import TINY_STUDENT as TINY
from _cli import flags, run_script
from store_factory import add_target_set, make_store, synthetic_transform

SET_ARRAYS = {"embed": (24,), "tokens": (16, 24)}  # a DINOv2-like set: a CLS embedding and a 4×4 token grid
SET_TRANSFORM = synthetic_transform(image_size=256, center_crop=224)  # another crop than the default set's


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = make_store(tmp_path_factory.mktemp("targets") / "pairs.zarr", n=8, num_points=160, shard_size=4)
    add_target_set(path, "dino", SET_ARRAYS, transform=SET_TRANSFORM)
    return path


def config(store, variant="distill", targets=None, **kw) -> TrainConfig:
    model = StudentConfig(**TINY, variant=variant, targets=targets)
    return TrainConfig(store=str(store), model=model, epochs=1, warmup_epochs=1, batch_size=4, device="cpu", **kw)


@pytest.mark.parametrize(
    "variant, targets, shape, pred",
    [
        ("distill", "dino/embed", (24,), (4, 24)),
        ("clip-target", "dino/embed", (24,), (4, 24)),
        ("no-concept", "dino/embed", (24,), (4, 24)),
        ("local", "dino/tokens", (16, 24), (4, 16, 24)),  # one row of the tokens per 3D patch (16 groups)
        ("distill", None, PREFIX_SHAPE, (4, *PREFIX_SHAPE)),  # the default set, as before target sets
        ("local", None, (PATCH_TOKENS, CLIP_DIM), (4, 16, CLIP_DIM)),
    ],
)
def test_a_run_trains_on_the_set_named_and_records_its_shape_and_teacher(
    store, tmp_path, variant, targets, shape, pred
):
    cfg = config(store, variant, targets, normalize_targets=True)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and summary["final_loss"] == pytest.approx(summary["final_loss"])  # finite
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    name = targets or f"clipcap/{ {'distill': 'prefix', 'local': 'patch_tokens'}[variant] }"
    assert recorded["config"]["model"]["target_shape"] == list(shape)
    assert recorded["config"]["model"]["targets"] == targets
    assert recorded["store"]["targets"] == name
    assert recorded["store"]["teacher"]["random"] is True
    assert (recorded["store"]["teacher"]["kind"] == "synthetic:dino") is (targets is not None)
    model = Student(recorded_config(tmp_path / "run").model)
    assert model(torch.randn(4, 128, 3)).pred.shape == pred


def test_the_local_variant_reads_the_crop_and_stats_of_its_set(store):
    loader, settings, _ = open_data(with_target(config(store, "local", "dino/tokens", normalize_targets=True)))
    assert (settings.crop.u0, settings.crop.v0, settings.crop.u1, settings.crop.v1) == teacher_crop(
        store, "train", "dino"
    )
    assert teacher_crop(store, "train", "dino") != teacher_crop(store, "train")  # 256→224 crops less than 224
    assert set(loader.stats) == {"targets/dino/tokens"}


def test_the_teacher_of_the_set_reaches_the_export_and_the_downstream_init(store, tmp_path):
    train(config(store, "distill", "dino/embed"), tmp_path / "run", progress=False)
    encoder = export_encoder(tmp_path / "run", tmp_path / "encoder.pth")
    report = init_encoder(PointEncoder.from_config(StudentConfig(**TINY)), str(encoder))
    assert report["teacher"] == {"kind": "synthetic:dino", "random": True, "seed": 0}
    assert report["random_teacher"] is True


def test_configs_refuse_targets_they_cannot_train_on():
    with pytest.raises(ConfigError, match="--variant recon regresses no teacher target"):
        StudentConfig(variant="recon", targets="clipcap/prefix")
    with pytest.raises(ConfigError, match="not SET/ARRAY"):
        StudentConfig(targets="dino")
    with pytest.raises(ConfigError, match=r"shape \(15, 24\), not \(T, D\) patch tokens of a square grid"):
        StudentConfig(variant="local", targets="dino/tokens", target_shape=(15, 24))
    with pytest.raises(ConfigError, match="has no target_shape"):
        Student(StudentConfig(**TINY))


def test_ablate_targets_gives_rows_per_target_set_and_a_targets_column(store, tmp_path):
    base = config(store, max_steps=1)
    out = tmp_path / "ablate"
    targets = ["clipcap/clip_embed", "dino/embed"]
    rows = run_ablation(base, ["distill", "recon"], [0], out, progress=False, targets=targets)
    assert [(r["variant"], r.get("targets")) for r in rows] == [
        ("distill", "clipcap/clip_embed"),
        ("distill", "dino/embed"),
        ("recon", None),
    ]
    assert all(r["status"] == "done" and r["steps"] == 1 for r in rows)
    for row, shape in zip(rows, ([512], [24], None)):
        recorded = json.loads((Path(row["run_dir"]) / "config.json").read_text())
        assert recorded["config"]["model"]["target_shape"] == shape
    assert Path(rows[1]["run_dir"]).name == "distill-dino-embed-seed0"
    markdown = (out / "table.md").read_text()
    assert markdown.startswith("| variant | targets | seed |")
    assert "| distill | dino/embed | 0 |" in markdown and "| distill [dino/embed] | dino/embed MSE | 1 |" in markdown
    again = run_ablation(base, ["distill"], [0], out, progress=False, targets=["dino/embed"], resume=True)
    assert [r["steps"] for r in again] == [1, 1, 1] and len(again) == 3  # nothing new, nothing trained twice


@pytest.mark.parametrize(
    "targets, named",
    [
        ("dino/embed,siglip/embed", "has no target set 'siglip'; it holds clipcap, dino"),
        ("dino/cls", "target set 'dino' has no array 'cls'; it holds embed, tokens"),
        ("dino/embed,dino/embed", "--targets must list each SET/ARRAY once"),
    ],
)
def test_ablate_refuses_a_wrong_target_with_exit_2_before_any_pretraining(store, tmp_path, targets, named):
    args = flags(**TINY, batch_size=4, max_steps=1, device="cpu", eval="none", targets=targets)
    done = run_script("pkd-train", "ablate", store, "--variants", "distill,recon", *args, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert named in " ".join(done.stderr.split())
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("table.json"))


@pytest.mark.parametrize(
    "args, named",
    [
        (["--targets", "siglip/embed"], "has no target set 'siglip'; it holds clipcap, dino"),
        (["--targets", "dino/cls"], "target set 'dino' has no array 'cls'; it holds embed, tokens"),
        (["--targets", "dino"], "--targets 'dino' is not SET/ARRAY"),
        (["--variant", "recon", "--targets", "dino/embed"], "--variant recon regresses no teacher target"),
        (["--variant", "local", "--targets", "dino/embed"], "not (T, D) patch tokens"),
    ],
)
def test_a_wrong_targets_exits_2_through_pkd_train_naming_the_choices(store, tmp_path, args, named):
    done = run_script("pkd-train", "distill", store, *args, "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert named in " ".join(done.stderr.split())
    assert not (tmp_path / "runs").exists()
