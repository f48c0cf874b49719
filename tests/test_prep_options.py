"""pkd-prep's options come from the config dataclasses: their help, renamed flags and checks."""

from __future__ import annotations

import dataclasses
import subprocess
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.common.options import dataclass_options
from pkd.preprocess import cli
from pkd.preprocess.config import PrepConfig, RunOptions, TeacherConfig
from pkd.preprocess.frame_sample import GeometryConfig

from _cli import run_script

WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}


def flat(text: str) -> str:
    """Help text with rich's box characters and line breaks folded into single spaces."""
    return " ".join(text.replace("│", " ").split())


def probe_app(options: dict[str, Any]) -> typer.Typer:
    """One command with ``options`` (as pkd-prep declares them) that prints the RunOptions it builds."""
    app = typer.Typer()

    @app.command()
    @cli.prep_options(options)
    def probe(**values: Any) -> None:
        typer.echo(repr(cli.configs(options, values, seed=0)["run"]))

    return app


@pytest.mark.parametrize("command, options", [("scannet", cli.SCANNET_OPTIONS), ("teacher", cli.TEACHER_RUN_OPTIONS)])
def test_help_is_the_dataclass_field_help(command, options):
    result = CliRunner().invoke(cli.app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for name, opt in options.items():
        assert f"--{name.replace('_', '-')}" in text
        assert flat(opt.help) in text, name
    assert "--points" not in text and "--workers" not in text  # the old spellings are hidden
    store_swap = flat(next(f for f in dataclasses.fields(RunOptions) if f.name == "overwrite").metadata["help"])
    assert (store_swap in text) == (command == "scannet")  # the teacher command's --overwrite is a named set's


def test_changing_a_field_help_changes_the_help():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Probe:
        dask_workers: int = option(0, "A help text written only here.")

    options = {**cli.TEACHER_OPTIONS, **dataclass_options(Probe, "run")}
    result = CliRunner().invoke(probe_app(options), ["--help"], env=WIDE)
    assert "A help text written only here." in flat(result.output)


@pytest.mark.parametrize("args, workers", [([], 0), (["--dask-workers", "3"], 3), (["--workers", "4"], 4)])
def test_renamed_flag_and_its_old_spelling_set_dask_workers(args, workers):
    result = CliRunner().invoke(probe_app(cli.TEACHER_RUN_OPTIONS), args)
    assert result.exit_code == 0, result.output
    assert f"dask_workers={workers}," in result.output


def run(*args: object) -> subprocess.CompletedProcess:
    return run_script("pkd-prep", *args, timeout=120)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher-batch", 0], "error: --teacher-batch must be at least 1, got 0."),
        (["--threads", 0], "error: --threads must be at least 1, got 0."),
        (["--dask-workers", -1], "error: --dask-workers must be at least 0, got -1."),
        (["--teacher", "clip"], "error: unknown teacher kind 'clip' (--teacher): choose 'clipcap'"),
        (["--precision", "int8"], "error: unknown teacher precision 'int8' (--precision): choose one of fp32"),
        (["--num-points", 70_000], "error: --num-points 70000 is above 65536"),
        (["--sampling", "grid"], "error: --sampling 'grid': choose 'fps' or 'random'."),
        (["--shard-size", 0], "error: --shard-size must be at least 1, got 0."),
        (["--depth-scale", 0], "error: --depth-scale must be positive"),
        (["--points", 0], "error: --num-points must be at least 1, got 0."),
        (
            ["--points", 8, "--num-points", 8],
            "error: --points is the old name of --num-points; pass only --num-points.",
        ),
    ],
)
def test_bad_option_exits_2_with_one_line_naming_it(tmp_path, extra, message):
    result = run("scannet", "--root", tmp_path, "--out", tmp_path / "pairs.zarr", "--no-progress", *extra)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert not (tmp_path / "pairs.zarr").exists()


def test_old_spelling_warns_that_it_is_deprecated(tmp_path):
    result = run("scannet", "--root", tmp_path, "--out", tmp_path / "pairs.zarr", "--workers", -1)
    assert "--workers is deprecated" in result.stderr and "use --dask-workers" in result.stderr
    assert "error: --dask-workers must be at least 0, got -1." in result.stderr


@pytest.mark.parametrize(
    "build",
    [
        lambda: RunOptions(threads=0),
        lambda: RunOptions(dask_workers=-1),
        lambda: TeacherConfig(kind="clip"),
        lambda: TeacherConfig(precision="int8"),
        lambda: GeometryConfig(num_points=0),
        lambda: GeometryConfig(sampling="grid"),
        lambda: PrepConfig(root="r", frame_skip=0),
        lambda: PrepConfig(root="r", limit=0),
        lambda: PrepConfig(root="r", depth_scale=0.0),
    ],
)
def test_python_callers_get_the_same_checks(build):
    with pytest.raises(ConfigError):
        build()


def test_run_options_are_keyword_only():
    with pytest.raises(TypeError):
        RunOptions(2)  # type: ignore[misc]
