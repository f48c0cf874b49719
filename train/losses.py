"""Losses of the variants, and ``compute_loss`` which combines them for one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pkd.common.store import PATCH_TOKENS
from pkd.train.model import Student, random_mask
from pkd.train.tokenizer import gather_points

GRID = int(round(PATCH_TOKENS ** 0.5))


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Point-MAE's Chamfer-L2 between point sets (N, k, 3): mean squared nearest distance, both ways."""
    dist = torch.cdist(pred, target) ** 2
    return dist.min(dim=2).values.mean() + dist.min(dim=1).values.mean()


@dataclass(frozen=True)
class CropBox:
    """The teacher's centre crop (u0, v0, u1, v1) in colour-image pixels, as open_clip's transform takes it."""

    u0: float
    v0: float
    u1: float
    v1: float


def patch_cells(uv: torch.Tensor, crop: CropBox) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major 7×7 patch index of each pixel (…, 2) and whether it lies inside the crop.

    Pixel centres sit at integer (u, v), so a pixel's area starts half a pixel before it (as in
    ``pkd.common.geometry.inside``, which decides ``in_view``).
    """
    origin = uv.new_tensor([crop.u0, crop.v0], dtype=torch.float32)
    size = uv.new_tensor([crop.u1 - crop.u0, crop.v1 - crop.v0], dtype=torch.float32)
    rel = (uv.float() + 0.5 - origin) / size
    inside = ((rel >= 0) & (rel < 1)).all(-1)
    cell = (rel * GRID).floor().long().clamp(0, GRID - 1)
    return cell[..., 1] * GRID + cell[..., 0], inside


def local_alignment(pred: torch.Tensor, patch_tokens: torch.Tensor, centre_pixels: torch.Tensor,
                    centre_in_view: torch.Tensor, crop: CropBox) -> torch.Tensor:
    """1 − cosine between each in-view centre's token (B, G, D) and the teacher patch token its pixel falls in."""
    cells, inside = patch_cells(centre_pixels, crop)
    keep = inside & centre_in_view
    target = patch_tokens.gather(1, cells.unsqueeze(-1).expand(-1, -1, patch_tokens.shape[-1]))
    cos = F.cosine_similarity(pred, target, dim=-1)
    return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)


@dataclass(frozen=True)
class LossSettings:
    """Settings of ``compute_loss`` that do not live in the model."""

    recon_weight: float = 1.0
    crop: CropBox | None = None


def compute_loss(model: Student, batch: dict[str, torch.Tensor], settings: LossSettings,
                 mask_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its named parts (as floats, for logging)."""
    spec = model.spec
    mask = None
    if spec.recon:
        cfg = model.cfg
        mask = random_mask(batch["points"].shape[0], cfg.num_group, cfg.mask_ratio, mask_generator)
        mask = mask.to(batch["points"].device)
    out = model(batch["points"], mask)
    parts: dict[str, torch.Tensor] = {}
    if spec.head == "token":
        parts["local"] = local_alignment(out.pred.float(), batch[spec.target],
                                         gather_points(batch["pixels"], out.centre_idx),
                                         gather_points(batch["in_view"].unsqueeze(-1), out.centre_idx)[..., 0],
                                         settings.crop)
    elif spec.target is not None:
        parts["distill"] = F.mse_loss(out.pred.float(), batch[spec.target])
    if spec.recon:
        k = out.recon_pred.shape[-2]
        parts["recon"] = chamfer_l2(out.recon_pred.float().reshape(-1, k, 3), out.recon_target.float().reshape(-1, k, 3))
    weights = {"recon": settings.recon_weight if spec.target else 1.0}
    total = sum(weights.get(name, 1.0) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
