"""Point-cloud tokenizer: farthest point sampling for patch centres, then kNN patches around them.

Pure torch, so it runs wherever the model runs (Point-MAE uses CUDA-only extensions for the same job).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, num: int) -> torch.Tensor:
    """Indices (B, num) of a deterministic FPS that starts from point 0 of every cloud.

    Each iteration is one ``_fps_step`` and nothing reads a value back to the host, so on a GPU the loop only
    queues kernels, and under ``torch.compile`` (``--compile``) each step fuses into one kernel.
    """
    batch, num_points, _ = xyz.shape
    if num > num_points:
        raise ValueError(f"cannot sample {num} centres from {num_points} points")
    nearest = torch.full((batch, num_points), float("inf"), device=xyz.device, dtype=xyz.dtype)
    chosen = [torch.zeros(batch, 1, dtype=torch.long, device=xyz.device)]
    for _ in range(num - 1):
        nearest, farthest = _fps_step(xyz, nearest, chosen[-1])
        chosen.append(farthest)
    return torch.cat(chosen, dim=1)


def _fps_step(xyz: torch.Tensor, nearest: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FPS iteration: squared distances to the centre ``last`` (B, 1) folded into ``nearest`` (B, P) by
    minimum, and the next centre (B, 1), the farthest point from all chosen so far (first one on ties)."""
    centre = xyz.gather(1, last.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    nearest = torch.minimum(nearest, ((xyz - centre) ** 2).sum(-1))
    return nearest, nearest.argmax(-1, keepdim=True)


@torch.no_grad()
def knn(xyz: torch.Tensor, centre_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of each centre's k nearest points, nearest first, the centre itself first."""
    centres = gather_points(xyz, centre_idx)
    dist = (centres**2).sum(-1, keepdim=True) + (xyz**2).sum(-1).unsqueeze(1) - 2 * centres @ xyz.transpose(1, 2)
    dist.scatter_(2, centre_idx.unsqueeze(-1), -1.0)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values (B, P, D) indexed by idx (B, ...) → (B, ..., D)."""
    batch = values.shape[0]
    flat = idx.reshape(batch, -1)
    out = values.gather(1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*idx.shape, values.shape[-1])


class Group(nn.Module):
    """FPS + kNN: (B, P, 3) points → patches (B, G, k, 3) relative to centres (B, G, 3), centre indices (B, G)."""

    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group = num_group
        self.group_size = group_size

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        centre_idx = farthest_point_sample(xyz, self.num_group)
        centres = gather_points(xyz, centre_idx)
        patches = gather_points(xyz, knn(xyz, centre_idx, self.group_size)) - centres.unsqueeze(2)
        return patches, centres, centre_idx
