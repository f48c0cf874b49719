"""3DETR's set loss (facebookresearch/3detr ``criterion.py``) with its ScanNet weights, and its targets.

* Matcher (``Matcher``): per scene, the Hungarian assignment (``scipy.optimize.linear_sum_assignment``) of
  queries to the scene's real boxes minimising cls · (−p(gt class)) + objectness · (−p(object))
  + center · L1(normalised centres) + giou · (−GIoU). ScanNet costs (``scripts/scannet_ep1080.sh``):
  giou 2, cls 1, center 0, objectness 0.
* Losses (``SetCriterion``), weights from ``scripts/scannet_ep1080.sh`` over ``main.py``'s defaults:
  semantic cross-entropy over all queries (unmatched → no-object, whose class weight is 0.25; weighted mean),
  weight 1; angle-bin cross-entropy 0.1 and Huber (δ = 1) angle residual 0.5; L1 of normalised centres 5;
  L1 of normalised sizes 1; 1 − GIoU 1; each box term summed over matched queries and divided by the number of
  real boxes in the batch (averaged over ranks, at least 1). The total sums the last decoder layer's loss and
  every earlier layer's (``aux_outputs``); parts of layer k < L − 1 are reported with the suffix ``_k``.
* GIoU (``utils/box_util.py`` ``generalized_box3d_iou``): for axis-aligned boxes (ScanNet, zero angle) 3DETR's
  formula is exact: IoU − (enclosing − union) / enclosing, zero for padded targets and degenerate pairs.
* Targets (``datasets/scannet.py`` ``__getitem__``): boxes padded to ``max_num_obj`` 64, centres scaled to
  [0, 1] by the cloud's min/max, sizes divided by its extent, zero angles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from pkd.common.errors import DataError
from pkd.train.distributed import all_reduce_mean

MAX_NUM_OBJ = 64
EPS = 1e-8


@dataclass(frozen=True)
class MatcherCosts:
    """3DETR's matcher costs for ScanNet (``scripts/scannet_ep1080.sh``)."""

    cls: float = 1.0
    objectness: float = 0.0
    giou: float = 2.0
    center: float = 0.0


@dataclass(frozen=True)
class LossWeights:
    """3DETR's ScanNet loss weights (``scripts/scannet_ep1080.sh`` over ``main.py``'s defaults)."""

    giou: float = 1.0
    sem_cls: float = 1.0
    no_object: float = 0.25
    angle_cls: float = 0.1
    angle_reg: float = 0.5
    center: float = 5.0
    size: float = 1.0


def box_volume(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 3:] - boxes[..., :3]).clamp(min=0).prod(dim=-1)


def axis_aligned_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Generalised IoU (B, K1, K2) of [min xyz, max xyz] boxes (B, K1, 6) and (B, K2, 6); columns where
    ``present`` (B, K2) is 0 are 0, as are pairs of degenerate boxes (3DETR's ``good_boxes``)."""
    a, b = boxes1[:, :, None], boxes2[:, None]
    inter = (torch.minimum(a[..., 3:], b[..., 3:]) - torch.maximum(a[..., :3], b[..., :3])).clamp(min=0).prod(-1)
    enclosing = (torch.maximum(a[..., 3:], b[..., 3:]) - torch.minimum(a[..., :3], b[..., :3])).prod(-1)
    sum_vols = box_volume(boxes1).clamp(min=EPS)[:, :, None] + box_volume(boxes2).clamp(min=EPS)[:, None]
    union = (sum_vols - inter).clamp(min=EPS)
    giou = inter / union - (enclosing - union) / enclosing.clamp(min=EPS)
    good = (enclosing > 2 * EPS) & (sum_vols > 4 * EPS)
    if present is not None:
        good = good & (present[:, None] > 0)
    return torch.where(good, giou, torch.zeros_like(giou))


@dataclass
class Assignment:
    """The matcher's result: for every query its matched target index (0 if unmatched) and a 0/1 mask."""

    per_prop_gt_inds: torch.Tensor  # (B, Q) int64
    proposal_matched_mask: torch.Tensor  # (B, Q) float32
    assignments: list[tuple[np.ndarray, np.ndarray]]  # per scene (query indices, target indices)


class HungarianMatcher(nn.Module):
    """3DETR's ``Matcher``: one-to-one assignment of queries to each scene's real boxes."""

    def __init__(self, costs: MatcherCosts = MatcherCosts()) -> None:
        super().__init__()
        self.costs = costs

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> Assignment:
        """``outputs`` one layer's predictions plus ``gious`` and ``center_dist`` (B, Q, M)."""
        prob = outputs["sem_cls_prob"]
        batch, queries = prob.shape[:2]
        labels = targets["gt_box_sem_cls_label"]
        cost = (
            -self.costs.cls * prob.gather(2, labels[:, None].expand(-1, queries, -1))
            - self.costs.objectness * outputs["objectness_prob"][..., None]
            + self.costs.center * outputs["center_dist"]
            - self.costs.giou * outputs["gious"]
        )
        cost_np = cost.float().cpu().numpy()
        counts = targets["nactual_gt"].tolist()
        inds = torch.zeros(batch, queries, dtype=torch.long)
        mask = torch.zeros(batch, queries)
        assignments = []
        for b, count in enumerate(counts):
            rows, cols = linear_sum_assignment(cost_np[b, :, :count]) if count else (np.zeros(0, int),) * 2
            inds[b, rows] = torch.from_numpy(cols).long()
            mask[b, rows] = 1.0
            assignments.append((rows, cols))
        return Assignment(inds.to(prob.device), mask.to(prob.device), assignments)


class SetCriterion(nn.Module):
    """3DETR's ``SetCriterion`` with its ScanNet weights: (total loss, dict of weighted parts)."""

    semcls_percls_weights: torch.Tensor

    def __init__(
        self, num_classes: int = 18, costs: MatcherCosts = MatcherCosts(), weights: LossWeights = LossWeights()
    ) -> None:
        super().__init__()
        self.matcher = HungarianMatcher(costs)
        self.weights = weights
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = weights.no_object
        self.register_buffer("semcls_percls_weights", class_weights)

    def forward(
        self, predictions: dict, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``predictions`` as ``DetectionHead.forward`` returns them; ``targets`` as ``build_targets``."""
        targets = dict(targets)
        nactual = targets["gt_box_present"].sum(dim=1).long()
        targets["nactual_gt"] = nactual
        num_boxes = all_reduce_mean(nactual.sum().float()).clamp(min=1).item()
        loss, parts = self.single_output(predictions["outputs"], targets, num_boxes)
        for k, aux in enumerate(predictions.get("aux_outputs", [])):
            aux_loss, aux_parts = self.single_output(aux, targets, num_boxes)
            loss = loss + aux_loss
            parts.update({f"{key}_{k}": value for key, value in aux_parts.items()})
        return loss, parts

    def single_output(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], num_boxes: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One decoder layer's weighted loss and parts (plus the unweighted, logged ``loss_cardinality``)."""
        outputs = dict(outputs)
        outputs["gious"] = axis_aligned_giou(outputs["boxes"], targets["gt_boxes"], targets["gt_box_present"])
        outputs["center_dist"] = torch.cdist(
            outputs["center_normalized"], targets["gt_box_centers_normalized"].to(outputs["center_normalized"]), p=1
        )
        match = self.matcher(outputs, targets)
        inds, mask = match.per_prop_gt_inds, match.proposal_matched_mask

        def matched(values: torch.Tensor) -> torch.Tensor:
            """Target values (B, M, ...) of every query's matched box (B, Q, ...)."""
            index = inds.reshape(*inds.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
            return values.gather(1, index)

        def per_box(values: torch.Tensor) -> torch.Tensor:
            return (values * mask).sum() / num_boxes

        logits = outputs["sem_cls_logits"]
        labels = torch.where(mask > 0, matched(targets["gt_box_sem_cls_label"]), logits.shape[-1] - 1)
        bins = outputs["angle_logits"].shape[-1]
        angle_label = matched(targets["gt_angle_class_label"])
        angle_target = matched(targets["gt_angle_residual_label"]) / (math.pi / bins)
        angle_pred = outputs["angle_residual_normalized"].gather(2, angle_label[..., None]).squeeze(-1)
        raw = {
            "loss_sem_cls": F.cross_entropy(logits.transpose(1, 2), labels, self.semcls_percls_weights),
            "loss_angle_cls": per_box(
                F.cross_entropy(outputs["angle_logits"].transpose(1, 2), angle_label, reduction="none")
            ),
            "loss_angle_reg": per_box(F.huber_loss(angle_pred, angle_target, reduction="none", delta=1.0)),
            "loss_center": per_box(outputs["center_dist"].gather(2, inds[..., None]).squeeze(-1)),
            "loss_size": per_box(
                F.l1_loss(
                    outputs["size_normalized"], matched(targets["gt_box_sizes_normalized"]), reduction="none"
                ).sum(-1)
            ),
            "loss_giou": per_box(1 - outputs["gious"].gather(2, inds[..., None]).squeeze(-1)),
        }
        w = self.weights
        scale = {
            "loss_sem_cls": w.sem_cls,
            "loss_angle_cls": w.angle_cls,
            "loss_angle_reg": w.angle_reg,
            "loss_center": w.center,
            "loss_size": w.size,
            "loss_giou": w.giou,
        }
        parts = {key: raw[key] * scale[key] for key in raw if scale[key] > 0}
        with torch.no_grad():
            objects = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            parts["loss_cardinality"] = F.l1_loss(objects, targets["nactual_gt"].float())
        total = torch.stack([value for key, value in parts.items() if key != "loss_cardinality"]).sum()
        return total, parts


def build_targets(
    boxes: Sequence[np.ndarray | torch.Tensor],
    classes: Sequence[np.ndarray | torch.Tensor],
    dims_min: torch.Tensor,
    dims_max: torch.Tensor,
    max_num_obj: int = MAX_NUM_OBJ,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """3DETR's target dict for a batch of scenes: per-scene boxes (M, 6) [min xyz, max xyz] and classes (M,),
    the clouds' (B, 3) min/max → padded (B, max_num_obj, ...) tensors on ``dims_min``'s device.

    Keys: gt_boxes (B, K, 6), gt_box_centers, gt_box_centers_normalized, gt_box_sizes,
    gt_box_sizes_normalized (B, K, 3), gt_box_angles, gt_angle_residual_label (B, K) float,
    gt_angle_class_label, gt_box_sem_cls_label (B, K) int64, gt_box_present (B, K) 0/1 float,
    point_cloud_dims_min, point_cloud_dims_max (B, 3)."""
    batch = len(boxes)
    padded = torch.zeros(batch, max_num_obj, 6)
    labels = torch.zeros(batch, max_num_obj, dtype=torch.long)
    present = torch.zeros(batch, max_num_obj)
    for b, (scene_boxes, scene_classes) in enumerate(zip(boxes, classes)):
        count = len(scene_boxes)
        if count > max_num_obj:
            name = names[b] if names is not None else f"scene {b} of the batch"
            raise DataError(
                f"{name} has {count} boxes, more than max_num_obj {max_num_obj} (3DETR's ScanNet limit); "
                "raise max_num_obj or check the scene's annotation."
            )
        padded[b, :count] = torch.as_tensor(np.asarray(scene_boxes), dtype=torch.float32).reshape(count, 6)
        labels[b, :count] = torch.as_tensor(np.asarray(scene_classes), dtype=torch.long)
        present[b, :count] = 1.0
    device = dims_min.device
    padded, labels, present = padded.to(device), labels.to(device), present.to(device)
    lo, hi = dims_min.float()[:, None], dims_max.float()[:, None]
    centers = (padded[..., :3] + padded[..., 3:]) / 2
    sizes = padded[..., 3:] - padded[..., :3]
    zeros = torch.zeros(batch, max_num_obj, device=device)
    return {
        "gt_boxes": padded,
        "gt_box_centers": centers,
        "gt_box_centers_normalized": (centers - lo) / (hi - lo) * present[..., None],
        "gt_box_sizes": sizes,
        "gt_box_sizes_normalized": sizes / (hi - lo),
        "gt_box_angles": zeros,
        "gt_angle_class_label": zeros.long(),
        "gt_angle_residual_label": zeros.clone(),
        "gt_box_sem_cls_label": labels,
        "gt_box_present": present,
        "point_cloud_dims_min": dims_min.float(),
        "point_cloud_dims_max": dims_max.float(),
    }
