"""The whole product on the demo scene: prep (with patch tokens) -> every ablation -> export -> reload."""

import json
import subprocess
import sys

import pytest
import torch

from pkd.preprocess.prep import RunOptions, run_prep
from pkd.preprocess.teacher import TeacherConfig

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
    variants = "distill,no-concept,clip-target,local,recon,recon+distill"
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
