"""The downstream registry: every registered benchmark gets its commands, and bad input exits 2 with one
paragraph through the installed console script, whatever the benchmark."""

from __future__ import annotations

import os

import pytest

from pkd.train.downstream.registry import benchmarks

from _cli import run_script

ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def test_every_registered_benchmark_has_its_commands():
    listing = run_script("pkd-train", "finetune", "--help", env=ENV).stdout
    tests = run_script("pkd-train", "test", "--help", env=ENV).stdout
    for name, bench in benchmarks().items():
        assert name in listing
        assert (name in tests) == bench.has_test


@pytest.mark.parametrize("name", list(benchmarks()))
def test_a_benchmark_without_its_data_exits_2_naming_the_folder(name, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    done = run_script(
        "pkd-train", "finetune", name, "--data", empty, "--init", "scratch", "--run-dir", tmp_path / "run",
        "--device", "cpu", cwd=tmp_path, env=ENV,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and str(empty) in done.stderr, done.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
