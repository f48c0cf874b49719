"""The frozen 2D teacher: CLIP ViT-B/32 (open_clip, OpenAI architecture) + ClipCap's MLP mapper.

An image goes through open_clip's eval transform (resize shortest side to 224, bicubic; centre crop
224; OpenAI mean/std), the CLIP image tower (``encode_image`` unnormalised → (512,)) and ClipCap's
mapper ``clip_project`` (Linear 512→3840, Tanh, Linear 3840→7680) viewed as a (10, 768) prefix — the
prefix ClipCap's ``ClipCaptionModel`` (prefix_length=10, prefix_size=512, MLP mapping) feeds GPT-2.
Only the image tower and the mapper are kept in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from pkd.common.errors import ConfigError, WeightsError
from pkd.common.logs import demoted
from pkd.common.store import CLIP_DIM, PREFIX_SHAPE, TeacherAttrs, TransformAttrs
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.config import TeacherConfig
from pkd.preprocess.torchvision_compat import import_open_clip

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by TeacherConfig.precision
PREFIX_LENGTH, EMBED_DIM = PREFIX_SHAPE
MAPPER_NAME = f"clipcap-mlp-prefix{PREFIX_LENGTH}"
IMAGE_SIZE = 224
# OpenAI CLIP preprocessing, pinned so an open_clip default change cannot silently alter targets.
RESIZE_MODE, INTERPOLATION = "shortest", "bicubic"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to a teacher's half precision on its device; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@dataclass
class TeacherOutput:
    """Teacher targets for a batch, float32: prefix (B,10,768), clip_embed (B,512), patch_tokens (B,49,512)."""

    prefix: torch.Tensor
    clip_embed: torch.Tensor
    patch_tokens: torch.Tensor | None = None


class ClipCapMLP(nn.Module):
    """ClipCap's ``MLP((512, 768*10//2, 768*10))`` mapper; key names match ``clip_project.*``."""

    def __init__(self, clip_dim: int = CLIP_DIM, prefix_length: int = PREFIX_LENGTH, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        hidden = embed_dim * prefix_length // 2
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim * prefix_length))

    def forward(self, clip_embed: torch.Tensor) -> torch.Tensor:
        return self.model(clip_embed).view(-1, self.prefix_length, self.embed_dim)


@dataclass
class Teacher:
    """CLIP image tower + ClipCap mapper, frozen, with the transform its inputs need."""

    visual: nn.Module
    mapper: ClipCapMLP
    transform: Callable[[Image.Image], torch.Tensor]
    identity: TeacherAttrs
    device: torch.device
    precision: str = "fp32"
    patch_tokens: bool = False
    image_size: int = IMAGE_SIZE

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> TeacherOutput:
        """Targets for (B,3,224,224) transformed images; outputs float32 on the teacher's device."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 3, {self.image_size}, {self.image_size}) from "
                f"Teacher.transform, got {tuple(images.shape)}"
            )
        x = images.to(self.device, torch.float32, non_blocking=True)
        tokens = None
        with autocast(self.device, self.precision):
            if self.patch_tokens:
                pooled, tokens = self.visual(x)
                tokens = (tokens @ self.visual.proj).float()
            else:
                pooled = self.visual(x)
        clip_embed = pooled.float()
        # ClipCap casts encode_image's output to float32 before its mapper; so do we.
        return TeacherOutput(prefix=self.mapper(clip_embed), clip_embed=clip_embed, patch_tokens=tokens)


def check_device(cfg: TeacherConfig) -> torch.device:
    """The teacher's torch device; a ConfigError for a device that is absent or a precision it cannot run."""
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid teacher device {cfg.device!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"teacher device {cfg.device!r} requested but CUDA is not available; use --device cpu.")
    if device.type == "cpu" and cfg.precision == "fp16":
        raise ConfigError("fp16 teacher precision needs a CUDA device; use fp32 on CPU.")
    if device.type == "cpu" and cfg.precision == "bf16":
        log.warning("bf16 teacher on CPU runs through CPU autocast and is very slow on most CPUs; fp32 is faster.")
    return device


def warn_random_teacher(what: str, seed: int) -> None:
    """Say loudly that targets come from seeded random weights: fine for tests and demos, useless to learn from."""
    log.warning(
        "!!! RANDOM TEACHER (seed %d): targets come from randomly initialised %s weights; "
        "use it for tests and demos only, never for real pre-training. !!!",
        seed,
        what,
    )


def _load_visual(visual: nn.Module, path: Path) -> None:
    tw.load_strictly(
        visual, tw.visual_state_dict(path), path, f"{tw.CLIP_MODEL}'s image tower", f"Get {tw.CLIP_SOURCE}"
    )


def _transform_identity(open_clip, transform) -> TransformAttrs:
    return TransformAttrs(
        image_size=IMAGE_SIZE,
        resize=f"{RESIZE_MODE} side to {IMAGE_SIZE}",
        interpolation=INTERPOLATION,
        center_crop=IMAGE_SIZE,
        mean=tuple(open_clip.OPENAI_DATASET_MEAN),
        std=tuple(open_clip.OPENAI_DATASET_STD),
        steps=tuple(getattr(t, "__name__", type(t).__name__) for t in transform.transforms),
    )


def teacher_config_identity(cfg: TeacherConfig) -> dict:
    """The part of a teacher's identity its config decides, known without building it (weights hashed later)."""
    random = cfg.kind == "random"
    return {
        "clip_model": tw.CLIP_MODEL,
        "mapper": MAPPER_NAME,
        "kind": cfg.kind,
        "random": random,
        "seed": cfg.seed if random else None,
        "precision": cfg.precision,
        "clip_embed": "encode_image, unnormalised",
        "patch_tokens": "ln_post then proj, 7x7 grid" if cfg.patch_tokens else None,
    }


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """Build the frozen teacher from local weight files (or seeded random weights for kind='random')."""
    device = check_device(cfg)
    random = cfg.kind == "random"
    files: dict[str, Any] = dict.fromkeys(
        ("clip_weights", "clip_weights_sha256", "clipcap_weights", "clipcap_weights_sha256")
    )
    if not random:
        clip_path = tw.resolve_clip_weights(cfg.clip_weights)
        if cfg.clipcap_weights is None:
            raise WeightsError(f"no ClipCap weights given. Get {tw.CLIPCAP_SOURCE}; {tw.RANDOM_HINT}.")
        clipcap_path = Path(cfg.clipcap_weights)
        mapper_state = tw.clipcap_mlp_state_dict(clipcap_path, PREFIX_LENGTH, EMBED_DIM, CLIP_DIM)
        for key, path in (("clip_weights", clip_path), ("clipcap_weights", clipcap_path)):
            files[key], files[f"{key}_sha256"] = path.name, tw.sha256_file(path)
    open_clip = import_open_clip()
    # open_clip warns that it loaded no pretrained weights: pkd loads them itself below
    with torch.random.fork_rng(devices=[]), demoted("", "No pretrained weights loaded"):
        torch.manual_seed(cfg.seed)
        model, _, transform = open_clip.create_model_and_transforms(
            tw.CLIP_MODEL,
            pretrained=None,
            device="cpu",
            image_mean=open_clip.OPENAI_DATASET_MEAN,
            image_std=open_clip.OPENAI_DATASET_STD,
            image_interpolation=INTERPOLATION,
            image_resize_mode=RESIZE_MODE,
        )
        mapper = ClipCapMLP()
    visual = model.visual
    del model  # the text tower is never used
    if random:
        warn_random_teacher("CLIP + ClipCap", cfg.seed)
    else:
        _load_visual(visual, clip_path)
        mapper.load_state_dict(mapper_state)
    visual.output_tokens = cfg.patch_tokens
    visual.eval().requires_grad_(False).to(device)
    mapper.eval().requires_grad_(False).to(device)
    identity = TeacherAttrs(
        **teacher_config_identity(cfg),
        **files,
        device=device.type,
        transform=_transform_identity(open_clip, transform),
        open_clip_version=open_clip.__version__,
    )
    return Teacher(
        visual=visual,
        mapper=mapper,
        transform=transform,
        identity=identity,
        device=device,
        precision=cfg.precision,
        patch_tokens=cfg.patch_tokens,
    )
