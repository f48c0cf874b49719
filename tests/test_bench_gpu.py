"""bench/gpu.sh, the prepared GPU check, runs its CPU-safe parts end to end at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_SH = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def gpu_sh(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow  # bench/gpu.sh end to end: a GPU check, run where a GPU is lent
def test_gpu_check_runs_its_cpu_safe_parts_and_reports_one_table(tmp_path):
    out = tmp_path / "gpu.json"
    done = gpu_sh("--device", "cpu", "--quick", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["stage"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    fp32, bf16 = rows["teacher fp32 bare forward"], rows["teacher bf16 bare forward"]
    assert fp32["min_cosine"] == pytest.approx(1.0) and fp32["max_rel_error"] == 0.0 and fp32["ratio"] == 1.0
    assert 0.99 < bf16["min_cosine"] < 1.0 and 0 < bf16["max_rel_error"] < 0.1
    assert 0 < fp32["float16_storage_rel_error"] < 1e-3 and fp32["images"] == 4
    assert rows["teacher fp16 bare forward"]["skipped"] == "fp16 needs CUDA"
    prep = rows["whole pkd-prep, demo scene"]
    assert prep["frames"] == 4 and prep["peer_images_per_s"] == fp32["images_per_s"]
    for name in ("distill step bf16", "fine-tune step bf16", "scannet-seg step bf16"):
        assert rows[name]["s_per_step"] > 0 and rows[name]["peer_s_per_step"] > 0 and rows[name]["peak_mib"] is None
        assert rows[f"{name} compiled"]["skipped"].startswith("compiled on CUDA only")
    assert "| scannet-seg step bf16 compiled" in out.with_suffix(".md").read_text()
    assert "| whole pkd-prep, demo scene" in done.stdout and "| fine-tune step bf16" in done.stdout
    for step in ("link pkd", "install dependencies", "import pkd", "bench/gpu.py", "total"):
        assert f"== {step}" in done.stderr  # every step timed


@pytest.mark.slow
def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
    done = gpu_sh("--device", "cuda", "--out", str(tmp_path / "gpu.json"))
    assert done.returncode != 0 and "torch sees no GPU" in done.stderr and not (tmp_path / "gpu.json").exists()
