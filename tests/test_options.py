"""``pkd.common.options``: CLI options derived from dataclass fields, and which of them the user typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer
from typer.testing import CliRunner

from pkd.common.config import option
from pkd.common.options import dataclass_options, given_on_command_line, with_options


@dataclass(frozen=True)
class Demo:
    name: str = option("a", "a name")
    count: int = option(3, "how many")
    limit: int | None = option(None, "optional cap", run=True)
    hidden: float = 1.0  # no help: not an option


def test_fields_with_help_become_options_with_their_defaults_and_run_marks() -> None:
    opts = dataclass_options(Demo, "demo", renamed={"count": "n"})
    assert set(opts) == {"name", "n", "limit"}
    assert [o.run for o in opts.values()] == [False, False, True]
    assert {o.section for o in opts.values()} == {"demo"}
    assert opts["n"].parameter("n").default == 3


def test_a_command_gains_the_options_and_knows_which_were_typed() -> None:
    seen: dict[str, Any] = {}
    app = typer.Typer()

    @app.command()
    @with_options(opt.parameter(name) for name, opt in dataclass_options(Demo).items())
    def run(**options: Any) -> None:
        seen.update(options=options, given=given_on_command_line())

    result = CliRunner().invoke(app, ["--count", "3", "--limit", "7"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == {"name": "a", "count": 3, "limit": 7}
    assert seen["given"] == {"count", "limit"}  # typed, even when equal to the default
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "how many" in help_text and "--hidden" not in help_text
