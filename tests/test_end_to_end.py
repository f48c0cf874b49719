"""The whole product on the demo scene: prep (with patch tokens) -> every ablation -> export -> reload."""

import json
import subprocess
import sys

import pytest
import torch

from pkd.preprocess.prep import RunOptions, run_prep
from pkd.preprocess.teacher import TeacherConfig
from pkd.train.variants import VARIANTS

from _cli import DEMO_TRAIN, flags, run_command
from conftest import demo_prep_config

TINY = flags(**DEMO_TRAIN, epochs=2)


def pkd_train(*args: str, cwd) -> subprocess.CompletedProcess:
    result = run_command(sys.executable, "-m", "pkd.train", *args, timeout=None, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # every variant in-process: test_train; ablate: test_ablation; export: test_train, test_exit_codes
def test_prep_then_every_variant_then_export(demo_root, tmp_path):
    store = tmp_path / "pairs.zarr"
    run_prep(
        demo_prep_config(demo_root),
        str(store),
        TeacherConfig(kind="random", patch_tokens=True),
        RunOptions(teacher_batch=2, progress=False),
    )
    variants = ",".join(VARIANTS)
    pkd_train(
        "ablate",
        str(store),
        "--variants",
        variants,
        "--max-steps",
        "2",
        "--name",
        "demo",
        "--eval",
        "none",
        *TINY,
        cwd=tmp_path,
    )
    rows = json.loads((tmp_path / "runs" / "ablate-demo" / "table.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == variants.split(",")
    assert all(row["steps"] == 2 and row["train_loss"] > 0 for row in rows)

    run = tmp_path / "runs" / "distill"
    pkd_train("distill", str(store), "--run-dir", str(run), "--max-steps", "2", *TINY, cwd=tmp_path)
    pkd_train("export", str(run), "--out", str(tmp_path / "encoder.pth"), cwd=tmp_path)
    exported = torch.load(tmp_path / "encoder.pth", weights_only=True)["base_model"]
    assert "MAE_encoder.blocks.blocks.1.attn.qkv.weight" in exported
    assert not any(k.startswith(("MAE_encoder.concept", "MAE_encoder.head")) for k in exported)


@pytest.mark.slow  # the README demo; demo-scene's own files: test_readers
def test_the_demo_writes_a_val_scene_and_a_demo_run_logs_its_held_out_loss(tmp_path):
    from pkd.common.store import open_store, splits_of
    from pkd.preprocess.demo import SCENE, VAL_SCENE, write_demo_scene
    from pkd.preprocess.scenes import split_lists

    from _cli import run_script

    root, alone = tmp_path / "scannet", tmp_path / "alone"
    result = run_script("pkd-prep", "demo-scene", "--out", root, "--frames", 60, "--layout", "sens")
    assert result.returncode == 0, result.stderr[-2000:]
    assert VAL_SCENE in split_lists()["val"] and {p.name for p in (root / "scans").iterdir()} == {SCENE, VAL_SCENE}
    write_demo_scene(alone, num_frames=60, layout="sens")  # the first scene and the split lists, byte for byte
    for path in (p for p in alone.rglob("*") if p.is_file()):
        assert (root / path.relative_to(alone)).read_bytes() == path.read_bytes(), path
    assert (root / "scans" / VAL_SCENE / f"{VAL_SCENE}_vh_clean_2.labels.ply").is_file()

    store = tmp_path / "pairs.zarr"
    run_prep(demo_prep_config(root), str(store), TeacherConfig(kind="random"), RunOptions(progress=False))
    assert set(splits_of(open_store(str(store)))) == {"train", "val"}
    run = tmp_path / "run"
    out = pkd_train("distill", str(store), "--run-dir", str(run), "--max-steps", "2", *TINY, cwd=tmp_path)
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert vals and all(r["loss"] > 0 and r["samples"] == 2 for r in vals) and "held-out loss" in out.stdout
