"""Training-time augmentation: unit-sphere normalisation, then Point-MAE's ScaleAndTranslate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pkd.common.config import option


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample, per-axis scale U(scale_low, scale_high) and translation U(-translate, translate)."""

    enabled: bool = option(True, "scale and translate clouds (off: only normalise them to the unit sphere)")
    scale_low: float = option(2.0 / 3.0, "lowest per-axis scale")
    scale_high: float = option(3.0 / 2.0, "highest per-axis scale")
    translate: float = option(0.2, "largest per-axis translation")


def normalize_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre every cloud (B, P, 3) at its mean and scale it so its farthest point lies on the unit sphere."""
    centred = points - points.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-8)
    return centred / radius[:, None, None]


def augment(points: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Normalise, then (if enabled) scale and translate each cloud; random numbers come from ``generator``."""
    points = normalize_unit_sphere(points)
    if not cfg.enabled:
        return points
    batch = points.shape[0]
    scale = torch.empty(batch, 1, 3).uniform_(cfg.scale_low, cfg.scale_high, generator=generator)
    shift = torch.empty(batch, 1, 3).uniform_(-cfg.translate, cfg.translate, generator=generator)
    return points * scale.to(points) + shift.to(points)
