"""Typer sub-apps for ``pkd-train``: ``finetune NAME`` and ``test NAME`` for every registered benchmark
(``pkd.train.downstream.registry``; the commands are ``pkd.train.downstream.commands``'), ``probe modelnet40``
and the ``compare`` command.

Wire them with ``app.add_typer(finetune_app, name="finetune")``, ``app.add_typer(probe_app, name="probe")``,
``app.add_typer(test_app, name="test")`` and ``app.command("compare")(compare_runs)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from pkd.common.options import dataclass_options, with_options
from pkd.train.downstream.commands import CLI_DEFAULTS, Init, Overwrite, RunDir, add_commands, summary
from pkd.train.downstream.probe import ProbeConfig

finetune_app = typer.Typer(
    help="Finetune an encoder on a downstream benchmark (each benchmark's reference protocol).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
probe_app = typer.Typer(
    help="Score frozen encoder features with a linear SVM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
test_app = typer.Typer(
    help="Re-score a finished fine-tuning run with a benchmark's test protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
add_commands(finetune_app, test_app)
PROBE_OPTIONS = {k: v for k, v in dataclass_options(ProbeConfig).items() if k != "drop_path"}  # eval mode only


def probe_parameters() -> Iterable[inspect.Parameter]:
    """The options of ``probe modelnet40``, with ProbeConfig's defaults."""
    return (opt.parameter(name, CLI_DEFAULTS.get(name, dataclasses.MISSING)) for name, opt in PROBE_OPTIONS.items())


Data = Annotated[Path, typer.Option(help="dataset folder (modelnet40_normal_resampled)")]


def compare_runs(
    runs: Annotated[list[Path], typer.Argument(help="run folders (searched recursively) or results files")],
    out: Annotated[Path, typer.Option(help="Markdown table; .json and .png are written beside it")] = Path(
        "runs/compare/table.md"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace an existing table")] = False,
) -> None:
    """One table across runs: every results.json / test_votes.json, mean ± std over seeds of equal settings."""
    from pkd.train.downstream.compare import format_markdown
    from pkd.train.downstream.run import compare

    rows, skipped = compare(runs, out, overwrite=overwrite)
    for line in skipped:
        typer.echo(f"skipped {line}", err=True)
    typer.echo(format_markdown(rows) + f"→ {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


@probe_app.command("modelnet40")
@with_options(probe_parameters())
def probe_modelnet40(
    data: Data, init: Init, run_dir: RunDir = None, overwrite: Overwrite = False, **options: Any
) -> None:
    """Linear SVM on frozen max+mean token features: ModelNet40 test accuracy."""
    from pkd.train.downstream.run import probe_modelnet40 as probe

    out = run_dir or Path("runs") / f"probe-modelnet40-{Path(init).stem or 'scratch'}"
    cfg = ProbeConfig(data=str(data), init=init, **options)
    typer.echo(f"linear probe: {summary(probe(cfg, out, overwrite=overwrite))} → {out}/results.json")
