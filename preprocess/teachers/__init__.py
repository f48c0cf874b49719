"""Teacher kinds: ``clipcap``, ``open_clip:<model>``, ``dinov2:<size>``, one module each, one interface.

``build_target_teacher(kind, ...)`` parses the kind, checks the options shared by all kinds and calls the
kind's builder. Adding a kind is one module defining ``KIND = TeacherKind(...)`` whose builder returns a
``TargetTeacher``, listed in ``KINDS`` below.
"""

from __future__ import annotations

from pkd.common.errors import ConfigError
from pkd.preprocess.teachers import clipcap, dinov2, open_clip_image
from pkd.preprocess.teachers.base import BuildOptions, TargetArray, TargetTeacher, TeacherKind

KINDS: dict[str, TeacherKind] = {k.name: k for k in (clipcap.KIND, open_clip_image.KIND, dinov2.KIND)}
KIND_HELP = "\n".join(f"{k.usage}: {k.help}" for k in KINDS.values())

__all__ = ["KINDS", "KIND_HELP", "TargetArray", "TargetTeacher", "TeacherKind", "build_target_teacher", "parse_kind"]


def parse_kind(kind: str) -> tuple[TeacherKind, str | None]:
    """The registered kind of ``name`` or ``name:<arg>`` and its argument; a ConfigError naming the kinds."""
    name, colon, arg = kind.partition(":")
    found = KINDS.get(name)
    if found is None or found.takes_arg != bool(colon) or (colon and not arg):
        usages = ", ".join(k.usage for k in KINDS.values())
        raise ConfigError(f"unknown teacher kind {kind!r} (--teacher): choose one of {usages}.")
    return found, arg if colon else None


def build_target_teacher(
    kind: str,
    *,
    weights: str | None = None,
    random: bool = False,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    patch_tokens: bool = False,
) -> TargetTeacher:
    """A frozen teacher of ``kind`` from local ``weights`` (or seeded random weights when ``random``)."""
    found, arg = parse_kind(kind)
    opts = BuildOptions(
        weights=weights, random=random, seed=seed, device=device, precision=precision, patch_tokens=patch_tokens
    )
    return found.build(arg, opts)
