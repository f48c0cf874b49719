"""The one interface every teacher kind implements, and the helpers the kinds share.

A teacher turns an image into named per-sample arrays (``TargetArray``) and says exactly what produced
them (``identity``: plain JSON, everything that decides the numbers, nothing about where they ran).
Device checks, half-precision autocast and the random-teacher warning are those of
``pkd.preprocess.teacher``, so every kind refuses and warns alike.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from pkd.common.errors import ConfigError, WeightsError
from pkd.common.store import TransformAttrs
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.config import TeacherConfig
from pkd.preprocess.teacher import autocast, check_device

MAX_SHOWN = 20  # choices named in full in an error; beyond that, the nearest ones
RANDOM_HINT = "or pass --random-weights for seeded random weights (tests and demos only)"


@dataclass(frozen=True)
class TargetArray:
    """One output array of a teacher, per sample; ``meaning`` is the one line recorded in the store."""

    name: str
    shape: tuple[int, ...]
    meaning: str


class TargetTeacher(Protocol):
    """A frozen 2D teacher: ``preprocess`` a PIL image, ``encode`` a batch of them into named arrays.

    ``transform`` follows ``common.geometry.teacher_crop_box``: the shortest side is resized to
    ``image_size``, then a ``center_crop`` square (what the model sees) is cut from the middle.
    """

    identity: dict[str, Any]
    transform: TransformAttrs
    arrays: tuple[TargetArray, ...]
    device: torch.device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The (3, C, C) float32 model input for one image (C = ``transform.center_crop``)."""
        ...

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Array name -> float32 (B, *shape) on the teacher's device for (B, 3, C, C) preprocessed images."""
        ...


@dataclass(frozen=True)
class BuildOptions:
    """What ``build_target_teacher`` passes to a kind's builder, besides the kind's own argument."""

    weights: str | None = None
    random: bool = False
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    patch_tokens: bool = False

    def check(self, spec: str, source: str) -> torch.device:
        """The device, after refusing weights with --random-weights or neither (``source``: where to get them)."""
        if self.random and self.weights is not None:
            raise ConfigError(f"teacher {spec}: pass either --weights or --random-weights, not both.")
        if not self.random and self.weights is None:
            raise WeightsError(f"teacher {spec} needs --weights: get {source}; {RANDOM_HINT}.")
        kind = "random" if self.random else "clipcap"  # TeacherConfig's kinds; only random-ness matters here
        return check_device(TeacherConfig(kind=kind, device=self.device, precision=self.precision, seed=self.seed))

    def identity(self, spec: str, model: str, library: Any) -> dict[str, Any]:
        """The identity fields every kind records: kind spec, model, random + seed, precision, library version."""
        return {
            "kind": spec,
            "model": model,
            "random": self.random,
            "seed": self.seed if self.random else None,
            "precision": self.precision,
            "library": library.__name__,
            "library_version": library.__version__,
        }


@dataclass(frozen=True)
class TeacherKind:
    """A registered kind: ``name`` or ``name:<arg>`` on the command line, and the builder behind it."""

    name: str
    usage: str  # e.g. "dinov2:<size>"
    help: str  # one line for --help
    takes_arg: bool
    build: Callable[[str | None, BuildOptions], TargetTeacher]


@dataclass
class ModuleTeacher:
    """A ``TargetTeacher`` over a torch forward that returns the named arrays (open_clip, DINOv2 kinds)."""

    identity: dict[str, Any]
    transform: TransformAttrs
    arrays: tuple[TargetArray, ...]
    device: torch.device
    precision: str
    image_transform: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.image_transform(image)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = checked_images(images, self.transform.center_crop).to(self.device, torch.float32, non_blocking=True)
        with autocast(self.device, self.precision):
            out = self.forward(x)
        return {a.name: out[a.name].float() for a in self.arrays}


def checked_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` if it is a (B, 3, size, size) batch, else a ValueError (a caller's bug, not a user's)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"expected images of shape (B, 3, {size}, {size}) from preprocess, got {tuple(images.shape)}")
    return images


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a model's initialisation without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def frozen(module: nn.Module, device: torch.device) -> nn.Module:
    """The module in eval mode, without gradients, on ``device``."""
    return module.eval().requires_grad_(False).to(device)


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """File name -> sha256 of each weight file, so the identity says exactly which weights ran."""
    return {path.name: tw.sha256_file(path) for path in paths}


def choose(value: str | None, choices: list[str] | tuple[str, ...], what: str, spec: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming them."""
    if value is None or value not in choices:
        if len(choices) <= MAX_SHOWN:
            shown = f"choose one of {', '.join(choices)}"
        else:  # open_clip lists over a hundred models: the nearest names, and how to list them all
            near = difflib.get_close_matches(value or "", choices, n=MAX_SHOWN, cutoff=0.5)
            shown = f"{len(choices)} known" + (f", nearest: {', '.join(near)}" if near else "")
        raise ConfigError(f"unknown {what} {value!r} in teacher kind {spec!r} (--teacher): {shown}.")
    return value
