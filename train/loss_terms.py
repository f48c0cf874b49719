"""The loss terms a variant combines (``pkd.train.variants``): target regression, local alignment, reconstruction.

Each term is an object with a name (its key in the logged parts and the loss weights), whether it needs a
reconstruction mask, and ``__call__(out, batch, settings)`` giving its loss for one batch.

Direct local alignment (paper §4.3.1, Table 5: "we compare each encoded patch from the 2D domain with the encoded
patch from 3D domain of the nearest projection distance"): ``--local-pairing patch`` (default) pairs every teacher
patch of the square token grid (7×7 for ClipCap's 49 tokens, 16×16 for a DINOv2 set of 256) with the 3D patch whose
centre projects nearest to that patch's centre pixel, among the centres that lie in the teacher's crop; ``centre``
pairs every in-crop 3D centre with the teacher patch its pixel falls in (pkd before 0.2). The paper names no loss:
pkd uses 1 − cosine similarity, averaged over the pairs, as CLIP-style feature alignment does (it ignores the scale
of the teacher's tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from pkd.common.errors import ConfigError
from pkd.train.tokenizer import gather_points

if TYPE_CHECKING:
    from pkd.train.losses import LossSettings
    from pkd.train.model import StudentOutput

LOCAL_PAIRINGS = ("patch", "centre")


def token_grid(shape: tuple[int, ...], where: str) -> int:
    """The side of the square patch grid of teacher tokens of sample shape (T, D) (7 for ClipCap's 49 tokens, 16
    for DINOv2's 256); ConfigError naming ``where`` (the target) for another shape."""
    side = math.isqrt(shape[0]) if len(shape) == 2 else 0
    if side == 0 or side * side != shape[0]:
        raise ConfigError(
            f"{where} has samples of shape {tuple(shape)}, not (T, D) patch tokens of a square grid; direct local "
            "alignment needs patch tokens: pass --targets SET/ARRAY naming a set's patch tokens."
        )
    return side


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Point-MAE's Chamfer-L2 between point sets (N, k, 3): mean squared nearest distance, both ways."""
    dist = torch.cdist(pred, target) ** 2
    return dist.min(dim=2).values.mean() + dist.min(dim=1).values.mean()


def patch_chamfer(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Chamfer-L2 of predicted and true masked patches (B, M, k, 3), patch by patch."""
    k = pred.shape[-2]
    return chamfer_l2(pred.float().reshape(-1, k, 3), target.float().reshape(-1, k, 3))


@dataclass(frozen=True)
class CropBox:
    """The teacher's centre crop (u0, v0, u1, v1) in colour-image pixels, as open_clip's transform takes it."""

    u0: float
    v0: float
    u1: float
    v1: float


def patch_cells(uv: torch.Tensor, crop: CropBox, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major ``grid``×``grid`` patch index of each pixel (…, 2) and whether it lies inside the crop.

    Pixel centres sit at integer (u, v), so a pixel's area starts half a pixel before it (as in
    ``pkd.common.geometry.inside``, which decides ``in_view``).
    """
    origin = uv.new_tensor([crop.u0, crop.v0], dtype=torch.float32)
    size = uv.new_tensor([crop.u1 - crop.u0, crop.v1 - crop.v0], dtype=torch.float32)
    rel = (uv.float() + 0.5 - origin) / size
    inside = ((rel >= 0) & (rel < 1)).all(-1)
    cell = (rel * grid).floor().long().clamp(0, grid - 1)
    return cell[..., 1] * grid + cell[..., 0], inside


def patch_centres(crop: CropBox, grid: int) -> torch.Tensor:
    """(grid², 2) pixel (u, v) of each teacher patch's centre, row-major as the teacher's tokens."""
    step = torch.tensor([(crop.u1 - crop.u0) / grid, (crop.v1 - crop.v0) / grid])
    row, col = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cells = torch.stack([col, row], dim=-1).reshape(-1, 2).float()
    return torch.tensor([crop.u0, crop.v0]) + (cells + 0.5) * step - 0.5


def _mean_distance(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean 1 − cosine of the paired rows of ``pred`` and ``target`` where ``keep``."""
    cos = F.cosine_similarity(pred, target, dim=-1)
    return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)


def local_alignment(
    pred: torch.Tensor,
    patch_tokens: torch.Tensor,
    centre_pixels: torch.Tensor,
    centre_in_view: torch.Tensor,
    crop: CropBox,
    pairing: str = "patch",
) -> torch.Tensor:
    """1 − cosine between the student's centre tokens (B, G, D) and the teacher's patch tokens (B, T, D) of a
    square grid (T = 49 for ClipCap's 7×7).

    ``pairing="patch"``: each teacher patch against the in-crop centre projecting nearest to it (batch items
    without one add nothing); ``"centre"``: each in-crop centre against the patch its pixel falls in.
    """
    grid = token_grid(tuple(patch_tokens.shape[1:]), "the teacher's patch tokens")
    cells, inside = patch_cells(centre_pixels, crop, grid)
    visible = inside & centre_in_view
    if pairing == "centre":
        target = patch_tokens.gather(1, cells.unsqueeze(-1).expand(-1, -1, patch_tokens.shape[-1]))
        return _mean_distance(pred, target, visible)
    patches = patch_centres(crop, grid).to(centre_pixels.device).expand(pred.shape[0], -1, -1)
    dist = torch.cdist(patches, centre_pixels.float())
    nearest = dist.masked_fill(~visible.unsqueeze(1), float("inf")).argmin(dim=2)  # (B, T)
    paired = pred.gather(1, nearest.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    keep = visible.any(dim=1, keepdim=True).expand(-1, nearest.shape[1])
    return _mean_distance(paired, patch_tokens, keep)


class LossTerm(Protocol):
    """One loss of a variant: ``name`` keys it in the logged parts and the weights; ``masked``: it needs a
    reconstruction mask (the student then runs its decoder); ``needs_crop``: it needs the teacher's crop.
    ``retarget`` and ``check_target`` let a config point a term that reads a target at any store array."""

    @property
    def name(self) -> str: ...

    @property
    def masked(self) -> bool: ...

    @property
    def needs_crop(self) -> bool: ...

    def __call__(self, out: StudentOutput, batch: dict[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        """This term's loss for one batch."""
        ...

    def retarget(self, path: str) -> LossTerm:
        """This term reading its target from the store array ``path`` (itself if it reads none)."""
        ...

    def check_target(self, shape: tuple[int, ...], where: str) -> None:
        """ConfigError naming ``where`` if this term cannot read a target of sample shape ``shape``."""
        ...


@dataclass(frozen=True)
class TargetMSE:
    """Mean squared error of the head's prediction against the store array ``target`` (prefix, CLIP embedding)."""

    target: str
    name: str = "distill"
    masked: bool = False
    needs_crop: bool = False

    def __call__(self, out: StudentOutput, batch: dict[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        assert out.pred is not None
        return F.mse_loss(out.pred.float(), batch[self.target])

    def retarget(self, path: str) -> TargetMSE:
        return replace(self, target=path)

    def check_target(self, shape: tuple[int, ...], where: str) -> None:
        """Any shape: the head predicts the whole array."""


@dataclass(frozen=True)
class LocalAlignment:
    """``local_alignment`` of the per-token prediction against the store's teacher patch tokens."""

    target: str = "patch_tokens"
    name: str = "local"
    masked: bool = False
    needs_crop: bool = True

    def __call__(self, out: StudentOutput, batch: dict[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        assert out.pred is not None and settings.crop is not None  # LossSettings.of gives the token head its crop
        return local_alignment(
            out.pred.float(),
            batch[self.target],
            gather_points(batch["pixels"], out.centre_idx),
            gather_points(batch["in_view"].unsqueeze(-1), out.centre_idx)[..., 0],
            settings.crop,
            settings.local_pairing,
        )

    def retarget(self, path: str) -> LocalAlignment:
        return replace(self, target=path)

    def check_target(self, shape: tuple[int, ...], where: str) -> None:
        token_grid(shape, where)


@dataclass(frozen=True)
class MaskedChamfer:
    """Point-MAE's masked reconstruction: Chamfer-L2 of the decoder's masked patches against the true ones."""

    name: str = "recon"
    masked: bool = True
    needs_crop: bool = False

    def __call__(self, out: StudentOutput, batch: dict[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        assert out.recon_pred is not None and out.recon_target is not None
        return patch_chamfer(out.recon_pred, out.recon_target)

    def retarget(self, path: str) -> MaskedChamfer:
        return self

    def check_target(self, shape: tuple[int, ...], where: str) -> None:
        """It reads no target."""
