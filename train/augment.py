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


def random_scale_shift(
    points: torch.Tensor, generator: torch.Generator, scale: tuple[float, float], shift: float, per_axis: bool
) -> torch.Tensor:
    """Each cloud (B, P, 3) scaled by U(scale) (per axis or one factor) and shifted by U(-shift, shift) per axis.

    Per axis it is Point-MAE's ScaleAndTranslate (pre-training and classification); with one factor the
    isotropic scale + shift of its part-segmentation script.
    """
    batch = points.shape[0]
    factor = torch.empty(batch, 1, 3 if per_axis else 1).uniform_(*scale, generator=generator)
    offset = torch.empty(batch, 1, 3).uniform_(-shift, shift, generator=generator)
    return points * factor.to(points) + offset.to(points)


def augment(points: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Normalise, then (if enabled) scale and translate each cloud; random numbers come from ``generator``."""
    points = normalize_unit_sphere(points)
    if not cfg.enabled:
        return points
    return random_scale_shift(points, generator, (cfg.scale_low, cfg.scale_high), cfg.translate, per_axis=True)
