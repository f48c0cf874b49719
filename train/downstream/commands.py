"""The commands ``pkd-train finetune NAME`` and ``pkd-train test NAME`` of a registered benchmark, built from
its ``Benchmark``: the options are its config's fields (their help is the field's, their defaults its
protocol's), and the shared arguments (``--init``, ``--run-dir``, ``--resume``, ``--overwrite``) are declared
here once, for the generated commands and for the few a benchmark writes itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pkd.common.options import cli_type, dataclass_options, given_on_command_line, with_options
from pkd.train.downstream.config import FinetuneConfig, resume_options
from pkd.train.downstream.registry import Benchmark, benchmarks
from pkd.train.runs import run_fields

Init = Annotated[
    str,
    typer.Option(help="encoder.pth (pkd-train export or any Point-MAE checkpoint), a pkd run directory, or 'scratch'"),
]
RunDir = Annotated[Path | None, typer.Option(help="output folder (default runs/<task>-<init name>)")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Resume = Annotated[
    bool,
    typer.Option(
        help="continue the run in --run-dir from its last.pt (flags not typed take the run's recorded values)"
    ),
]
Overwrite = Annotated[bool, typer.Option(help="replace an existing --run-dir")]
# on the command line a GPU is used when there is one, and FPS pools / parsed scenes are cached
CLI_DEFAULTS = {"device": "auto", "cache_dir": "runs/cache"}


def option_parameters(config: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The typer options of ``config``'s fields that carry help, with its defaults (``CLI_DEFAULTS`` first)."""
    return [
        opt.parameter(name, CLI_DEFAULTS.get(name, dataclasses.MISSING))
        for name, opt in dataclass_options(config).items()
        if name not in exclude
    ]


def data_parameter(help: str, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """``--data`` with a benchmark's own help (required unless ``default`` is given)."""
    kind = Path if default is inspect.Parameter.empty else Path | None
    annotation = Annotated[kind, typer.Option(help=help)]  # type: ignore[valid-type]  # runtime type
    return inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def run_dir_for(bench: Benchmark, cfg: FinetuneConfig, run_dir: Path | None) -> Path:
    """``run_dir``, or runs/<benchmark folder name>-<init name>."""
    return run_dir or Path("runs") / f"{bench.folder_name(cfg)}-{Path(cfg.init).stem or 'scratch'}"


def summary(results: dict[str, Any]) -> str:
    """The run's schema records as 'metric value %', and how much of the test split was used (ScanNet: val
    scenes, and of their vertices how many were predicted)."""
    from pkd.train.downstream.engine import describe_data

    values = ", ".join(f"{r['metric']} {r['value']:.2f} {r['unit']}" for r in results["records"])
    if "data" not in results:
        return values
    note = describe_data(results)
    vertices = (results.get("test") or {}).get("vertex_coverage")
    if vertices:
        note += f", {vertices['predicted_vertices']} of {vertices['vertices']} vertices predicted"
    return f"{values} ({note})"


def finetune_and_report(
    bench: Benchmark, data: Path, init: str, run_dir: Path | None, resume: bool, overwrite: bool, options: dict
) -> None:
    """Finetune (or resume, taking the untyped options from the run's config.json) and report."""
    from pkd.train.downstream.run import run_finetune

    cfg = FinetuneConfig.for_task(bench.name, data, init=init, **options)
    out = run_dir_for(bench, cfg, run_dir)
    if resume:
        options = resume_options(out, options, given_on_command_line(), run_fields(bench.config))
        cfg = FinetuneConfig.for_task(bench.name, data, init=init, **options)
    results = run_finetune(cfg, out, resume=resume, overwrite=overwrite)
    if results["test"] is None:  # a DDP rank other than 0: rank 0 reports
        return
    init_note = results["init"]
    typer.echo(
        f"{bench.name} from {init_note['init']} ({init_note['used']} encoder tensors loaded, "
        f"{init_note['unexpected']} other keys ignored): {summary(results)}, best epoch "
        f"{results['best']['epoch']} → {out}/results.json"
    )


def finetune_command(bench: Benchmark) -> Callable[..., None]:
    """``finetune NAME``: its config's options, ``--data`` with its help."""

    def command(
        init: Init, run_dir: RunDir = None, resume: Resume = False, overwrite: Overwrite = False, **options: Any
    ) -> None:
        data = options.pop("data")
        finetune_and_report(bench, data, init, run_dir, resume, overwrite, options)

    command.__doc__ = bench.summary
    return with_options([data_parameter(bench.data_help), *option_parameters(bench.config)])(command)


def test_command(bench: Benchmark) -> Callable[..., None]:
    """``test NAME RUN``: score RUN's best weights again; ``test_options`` default to the run's recorded values."""
    options = dataclass_options(bench.config)
    extra = [
        data_parameter(bench.data_help + " (default: the run's)", None)
        if name == "data"
        else inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                cli_type(options[name].kind | None), typer.Option(help=f"{options[name].help} (default: the run's)")
            ],
        )
        for name in bench.test_options
    ]

    def command(
        run: Annotated[Path, typer.Argument(help="folder of a finished `pkd-train finetune` run of this benchmark")],
        out: Annotated[Path | None, typer.Option(help="output folder (default RUN/test)")] = None,
        device: Device = "auto",
        overwrite: Annotated[bool, typer.Option(help="replace an existing OUT/results.json")] = False,
        **changes: Any,
    ) -> None:
        from pkd.train.downstream.run import run_test

        results = run_test(bench, run, out, overwrite=overwrite, device=device, **changes)
        typer.echo(f"{bench.name} {run}: {summary(results)} → {out or run / 'test'}/results.json")

    command.__doc__ = bench.test_summary
    return with_options(extra)(command)


def add_commands(finetune_app: typer.Typer, test_app: typer.Typer) -> None:
    """One ``finetune NAME`` (and, where the benchmark has one, ``test NAME``) per registered benchmark."""
    for name, bench in benchmarks().items():
        finetune_app.command(name)(bench.finetune_command or finetune_command(bench))
        if bench.has_test:
            test_app.command(name)(bench.test_command or test_command(bench))
