"""Typer options derived from dataclass fields: a stage's config declares each option once.

A field declared with ``pkd.common.config.option(default, help)`` becomes ``--field-name`` with that
default and help; ``with_options`` gives a typer command taking ``**options`` those parameters, and
``given_on_command_line`` tells which of them the user typed (the rest are defaults). A renamed option
keeps its old spelling for one release as a hidden alias (``alias_parameter``, ``apply_aliases``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from pkd.common.config import flag
from pkd.common.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Option:
    """One CLI option: the config section its value lives in (None: the top level), its field and CLI type."""

    section: str | None
    field: dataclasses.Field[Any]
    kind: Any

    @property
    def run(self) -> bool:
        """A run option: it does not change what is computed, so a resumed run may change it."""
        return bool(self.field.metadata.get("run"))

    @property
    def help(self) -> str:
        return str(self.field.metadata["help"])

    def parameter(self, name: str, default: Any = dataclasses.MISSING) -> inspect.Parameter:
        """The keyword-only typer parameter ``name`` (default: the field's)."""
        import typer

        annotation = Annotated[self.kind, typer.Option(help=self.help)]  # type: ignore[name-defined]  # runtime type
        value = self.field.default if default is dataclasses.MISSING else default
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)


def cli_type(hint: Any) -> Any:
    """A field's type as typer reads it (``X | None`` spelled ``Optional[X]``, which typer understands)."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]  # noqa: UP045 (a runtime hint for typer)
    return hint


def dataclass_options(
    cls: type, section: str | None = None, renamed: Mapping[str, str] | None = None
) -> dict[str, Option]:
    """The options of ``cls``: every field carrying help, by option name (``renamed`` maps field → name)."""
    hints = get_type_hints(cls)
    return {
        (renamed or {}).get(f.name, f.name): Option(section, f, cli_type(hints[f.name]))
        for f in dataclasses.fields(cls)
        if "help" in f.metadata
    }


def with_options(parameters: Iterable[inspect.Parameter]) -> Callable[[F], F]:
    """Decorate a typer command taking ``**options``: it gains ``parameters`` (keyword-only) in their place."""

    def decorate(func: F) -> F:
        added = list(parameters)
        own = inspect.signature(func, eval_str=True)
        params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD] + added
        func.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        func.__annotations__ = {**get_type_hints(func, include_extras=True), **{p.name: p.annotation for p in added}}
        return func

    return decorate


def by_section(options: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str | None, dict[str, Any]]:
    """The values of ``options`` in ``values`` (by option name) as constructor keywords, by section."""
    parts: dict[str | None, dict[str, Any]] = {opt.section: {} for opt in options.values()}
    for name, opt in options.items():
        if name in values:
            parts[opt.section][opt.field.name] = values[name]
    return parts


def alias_parameter(old: str, option: Option) -> inspect.Parameter:
    """A hidden option spelt ``old`` for ``option``, kept for one release after a rename (None when not given)."""
    import typer

    kind = cli_type(option.kind | None)  # a runtime type for typer
    annotation = Annotated[kind, typer.Option(flag(old), hidden=True)]  # type: ignore[valid-type]  # runtime type
    return inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def apply_aliases(values: Mapping[str, Any], aliases: Mapping[str, str], removed_in: str) -> dict[str, Any]:
    """``values`` with each old spelling of ``aliases`` (old → new name) folded into its new name: a given old
    one is used with a deprecation warning naming the release ``removed_in`` that drops it; both given is a
    ConfigError."""
    out = {k: v for k, v in values.items() if k not in aliases}
    for old, new in aliases.items():
        if values.get(old) is None:
            continue
        if new in given_on_command_line():
            raise ConfigError(f"{flag(old)} is the old name of {flag(new)}; pass only {flag(new)}.")
        log.warning("%s is deprecated and goes in pkd %s; use %s.", flag(old), removed_in, flag(new))
        out[new] = values[old]
    return out


def was_given(ctx: Any, name: str) -> bool:
    """Whether parameter ``name`` of the running command was typed (or set in the environment), not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def given_on_command_line() -> set[str]:
    """Names of the running command's parameters that were typed (not left at their defaults)."""
    from typer._click.globals import get_current_context  # typer 0.29 vendors click (see pkd.common.cli)

    ctx = get_current_context()
    return {name for name in ctx.params if was_given(ctx, name)}
