"""Typer options derived from ``TrainConfig`` (and its model and augment configs): one declaration per option.

Each config field becomes ``--field-name`` (nested fields flattened: ``--dim``, ``--head``; the augment
switch is ``--augment/--no-augment``) with the field's default and help. ``distill`` and ``ablate`` take
the same options; ``resume_config`` implements ``--resume`` on a run's recorded config with the rule of
``pkd.train.runs.resume_values``, the one fine-tuning uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from pkd.common.config import flag
from pkd.common.errors import ConfigError
from pkd.common.options import Option, by_section, dataclass_options, was_given, with_options
from pkd.train.augment import AugmentConfig
from pkd.train.config import TrainConfig
from pkd.train.model import StudentConfig
from pkd.train.runs import refused_changes, resume_values

if TYPE_CHECKING:
    import typer

F = TypeVar("F", bound=Callable[..., Any])

SECTIONS: dict[str | None, type] = {None: TrainConfig, "model": StudentConfig, "augment": AugmentConfig}
FLAG_NAMES = {"augment": {"enabled": "augment"}}  # fields whose flag is not their name (not a deprecation)


def _options() -> dict[str, Option]:
    out: dict[str, Option] = {}
    for section, cls in SECTIONS.items():
        out.update(dataclass_options(cls, section, FLAG_NAMES.get(section or "")))
    return out


OPTIONS = {"variant": _options()["variant"], **_options()}


def config_options(exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorate a typer command taking ``**options``: it gains every config option except ``exclude``."""
    return with_options(opt.parameter(name) for name, opt in OPTIONS.items() if name not in set(exclude))


def build_config(store: str, values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from option values (options not in ``values`` take their defaults)."""
    parts = by_section(OPTIONS, values)
    return TrainConfig(
        store=store, model=StudentConfig(**parts["model"]), augment=AugmentConfig(**parts["augment"]), **parts[None]
    )


def option_values(cfg: TrainConfig) -> dict[str, Any]:
    """Every option's value in ``cfg``, by option name."""
    return {
        name: getattr(cfg if opt.section is None else getattr(cfg, opt.section), opt.field.name)
        for name, opt in OPTIONS.items()
    }


def given_options(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options of ``values`` that were typed on the command line (or set in the environment)."""
    return {k: v for k, v in values.items() if k in OPTIONS and was_given(ctx, k)}


def resume_config(saved: TrainConfig, store: str, given: dict[str, Any], what: str) -> TrainConfig:
    """``saved`` (a run's recorded config) with the run options of ``given`` applied.

    Options not given keep the saved values (run options not given take their defaults); a given option that
    changes what is computed must equal the saved value, else ConfigError naming each difference (``what``
    names the run in the message).
    """
    recorded, may_change = option_values(saved), run_option_names()
    differ = [
        f"{flag(k)} {given[k]!r} (the run has {recorded[k]!r})" for k in refused_changes(recorded, given, may_change)
    ]
    if store != saved.store:
        differ.insert(0, f"store {store} (the run has {saved.store})")
    if differ:
        runs = ", ".join(flag(k) for k, o in OPTIONS.items() if o.run)
        raise ConfigError(
            f"{what} was trained with other settings: {'; '.join(differ)}. Resume without those "
            f"flags (the run's own values are used; only {runs} may change) or start a new run."
        )
    defaults = {k: opt.field.default for k, opt in OPTIONS.items()}
    return build_config(saved.store, resume_values(recorded, {**defaults, **given}, given, may_change))


def run_option_names() -> tuple[str, ...]:
    """Options a resumed run may change (they do not change what is computed)."""
    return tuple(name for name, opt in OPTIONS.items() if opt.run)
