"""``clipcap``: today's teacher (CLIP ViT-B/32 + ClipCap MLP, ``pkd.preprocess.teacher``) behind the interface.

Arrays: ``prefix`` (10, 768), ``clip_embed`` (512,) and, on request, ``patch_tokens`` (49, 512). ``weights``
is the folder ``pkd-prep --weights-dir`` takes (``ViT-B-32.pt`` and ``conceptual_weights.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pkd.common.errors import WeightsError
from pkd.common.store import CLIP_DIM, PATCH_TOKENS, PREFIX_SHAPE, TransformAttrs
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.config import CLIP_FILE, CLIPCAP_FILE, TeacherConfig
from pkd.preprocess.teacher import Teacher, build_teacher
from pkd.preprocess.teachers.base import BuildOptions, TargetArray, TeacherKind

NAME = "clipcap"


@dataclass
class ClipCapTeacher:
    """``pkd.preprocess.teacher.Teacher`` as a ``TargetTeacher``."""

    teacher: Teacher
    identity: dict[str, Any]
    transform: TransformAttrs
    arrays: tuple[TargetArray, ...]
    device: torch.device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.teacher.transform(image)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.teacher.encode(images)
        arrays = {"prefix": out.prefix, "clip_embed": out.clip_embed}
        if out.patch_tokens is not None:
            arrays["patch_tokens"] = out.patch_tokens
        return arrays


def _weight_files(folder: str) -> tuple[str, str]:

    path = Path(folder)
    if not path.is_dir():
        raise WeightsError(
            f"teacher clipcap: --weights {path} is not a folder; pass the folder holding {CLIP_FILE} "
            f"({tw.CLIP_SOURCE}) and {CLIPCAP_FILE} ({tw.CLIPCAP_SOURCE})."
        )
    return str(path / CLIP_FILE), str(path / CLIPCAP_FILE)


def build(arg: str | None, opts: BuildOptions) -> ClipCapTeacher:
    """The ClipCap teacher from a weights folder, or seeded random weights."""
    opts.check(NAME, f"the folder of {tw.CLIP_SOURCE} and {tw.CLIPCAP_SOURCE}")
    clip, clipcap = _weight_files(opts.weights) if opts.weights is not None else (None, None)
    teacher = build_teacher(
        TeacherConfig(
            kind="random" if opts.random else "clipcap",
            clip_weights=clip,
            clipcap_weights=clipcap,
            device=opts.device,
            precision=opts.precision,
            seed=opts.seed,
            patch_tokens=opts.patch_tokens,
        )
    )
    attrs = teacher.identity
    arrays = [
        TargetArray("prefix", PREFIX_SHAPE, "ClipCap MLP mapper output on clip_embed"),
        TargetArray("clip_embed", (CLIP_DIM,), attrs.clip_embed),
    ]
    if attrs.patch_tokens is not None:
        arrays.append(TargetArray("patch_tokens", (PATCH_TOKENS, CLIP_DIM), attrs.patch_tokens))
    identity = {
        **attrs.comparable(),
        "kind": NAME,
        "library": "open_clip",
        "library_version": attrs.open_clip_version,
        "arrays": {a.name: a.meaning for a in arrays},
    }
    return ClipCapTeacher(teacher, identity, attrs.transform, tuple(arrays), teacher.device)


KIND = TeacherKind(
    name=NAME,
    usage=NAME,
    help="CLIP ViT-B/32 + ClipCap MLP (the paper's): prefix (10,768), clip_embed (512,), patch_tokens (49,512)",
    takes_arg=False,
    build=build,
)
