"""Losses of the variants, and ``compute_loss`` which combines them for one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from pkd.common.store import PATCH_TOKENS
from pkd.train.model import MaskedDecoder, Student, StudentConfig, Variant, random_mask, variant_spec
from pkd.train.tokenizer import gather_points

GRID = int(round(PATCH_TOKENS**0.5))


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


def local_alignment(
    pred: torch.Tensor,
    patch_tokens: torch.Tensor,
    centre_pixels: torch.Tensor,
    centre_in_view: torch.Tensor,
    crop: CropBox,
) -> torch.Tensor:
    """1 − cosine between each in-view centre's token (B, G, D) and the teacher patch token its pixel falls in."""
    cells, inside = patch_cells(centre_pixels, crop)
    keep = inside & centre_in_view
    target = patch_tokens.gather(1, cells.unsqueeze(-1).expand(-1, -1, patch_tokens.shape[-1]))
    cos = F.cosine_similarity(pred, target, dim=-1)
    return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    """What ``compute_loss`` computes: the variant, its reconstruction mask, loss weights and the teacher crop."""

    variant: Variant
    num_group: int
    mask_ratio: float
    recon_weight: float = 1.0
    crop: CropBox | None = None

    @classmethod
    def of(cls, model: StudentConfig, recon_weight: float = 1.0, crop: CropBox | None = None) -> LossSettings:
        """The settings of a student config's variant."""
        return cls(
            variant=variant_spec(model.variant),
            num_group=model.num_group,
            mask_ratio=model.mask_ratio,
            recon_weight=recon_weight,
            crop=crop,
        )

    def mask(self, batch: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """A reconstruction mask (B, G) drawn from ``generator`` (None: torch's global generator)."""
        return random_mask(
            batch, self.num_group, self.mask_ratio, torch.default_generator if generator is None else generator
        )


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    mask_generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its named parts (as floats, for logging).

    ``model`` is a Student of ``settings.variant`` or its DDP wrapper; only its forward is called.
    """
    spec = settings.variant
    mask = None
    if spec.recon:
        mask = settings.mask(batch["points"].shape[0], mask_generator).to(batch["points"].device)
    out = model(batch["points"], mask)
    parts: dict[str, torch.Tensor] = {}
    if spec.head == "token":
        assert spec.target is not None and settings.crop is not None  # LossSettings.of gives the token head its crop
        parts["local"] = local_alignment(
            out.pred.float(),
            batch[spec.target],
            gather_points(batch["pixels"], out.centre_idx),
            gather_points(batch["in_view"].unsqueeze(-1), out.centre_idx)[..., 0],
            settings.crop,
        )
    elif spec.target is not None:
        parts["distill"] = F.mse_loss(out.pred.float(), batch[spec.target])
    if spec.recon:
        parts["recon"] = patch_chamfer(out.recon_pred, out.recon_target)
    weights = {"recon": settings.recon_weight if spec.target else 1.0}
    total = cast(torch.Tensor, sum(weights.get(name, 1.0) * value for name, value in parts.items()))
    return total, {name: float(value.detach()) for name, value in parts.items()}


def patch_chamfer(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Chamfer-L2 of predicted and true masked patches (B, M, k, 3), patch by patch."""
    k = pred.shape[-2]
    return chamfer_l2(pred.float().reshape(-1, k, 3), target.float().reshape(-1, k, 3))


def monitor_recon_loss(
    model: Student, decoder: MaskedDecoder, points: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Chamfer-L2 of a (frozen, randomly initialised) ``decoder`` reconstructing the masked patches from the
    student encoder's visible tokens: the paper's Table 7 probe of what distillation does to reconstruction."""
    patches, centres, _ = model.group_divider(points)
    return patch_chamfer(*model.reconstruct(decoder, patches, centres, mask))
