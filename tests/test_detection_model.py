"""3DETR detection on pkd's encoder: model outputs, matcher, GIoU, a training step, encoder init, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkd.common.errors import ConfigError, DataError
from pkd.train.downstream.detection_data import SampleConfig, collate, scene_sample
from pkd.train.downstream.detection_loss import HungarianMatcher, SetCriterion, axis_aligned_giou, build_targets
from pkd.train.downstream.detection_model import Detector, ball_query
from pkd.train.downstream.models import init_encoder
from pkd.train.encoder import EncoderConfig, PointEncoder

TINY = EncoderConfig(dim=32, depth=2, heads=2, drop_path=0.0)
BOXES = np.array([[0.5, 0.5, 0.0, 1.5, 1.5, 1.0], [2.0, 2.2, 0.0, 3.0, 3.5, 2.0]], np.float32)


def tiny_detector(**kwargs) -> Detector:
    sizes = dict(num_queries=16, preenc_points=64, preenc_samples=16, preenc_radius=0.5)
    sizes |= dict(dec_layers=2, dec_dim=32, dec_heads=2, dec_ffn=32)
    return Detector(TINY, **{**sizes, **kwargs})


def scene(rng: np.random.Generator, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """A 4 m cube of random points with the two BOXES' corners and interiors; rgb = 40 · (object id + 1)."""
    parts, ids = [rng.random((n, 3)) * 4], [np.zeros(n)]
    for i, box in enumerate(BOXES):
        corners = np.array(
            [[box[3 * a], box[1 + 3 * b], box[2 + 3 * c]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        )
        parts += [corners, box[:3] + rng.random((30, 3)) * (box[3:] - box[:3])]
        ids += [np.full(38, i + 1)]
    rgb = np.repeat((np.concatenate(ids) * 40)[:, None], 3, axis=1).astype(np.uint8)
    return np.concatenate(parts).astype(np.float32), rgb


def batch(seed: int = 0, num_points: int = 512):
    rng = np.random.default_rng(seed)
    xyz, rgb = scene(rng)
    cfg = SampleConfig(num_points=num_points, random_cuboid_min_points=500)
    samples = [scene_sample(xyz, rgb, BOXES, np.array([1, 3]), rng, augment=True, cfg=cfg) for _ in range(2)]
    return collate(samples)


def test_detector_outputs_every_decoder_layer_with_3detr_keys_and_shapes():
    torch.manual_seed(0)
    inputs, _ = batch()
    out = tiny_detector()(inputs["point_clouds"], inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])
    assert len(out["aux_outputs"]) == 1
    expected = {
        "sem_cls_logits": (2, 16, 19),
        "center_normalized": (2, 16, 3),
        "center_unnormalized": (2, 16, 3),
        "size_normalized": (2, 16, 3),
        "size_unnormalized": (2, 16, 3),
        "angle_logits": (2, 16, 1),
        "angle_residual": (2, 16, 1),
        "angle_residual_normalized": (2, 16, 1),
        "angle_continuous": (2, 16),
        "objectness_prob": (2, 16),
        "sem_cls_prob": (2, 16, 18),
        "boxes": (2, 16, 6),
    }
    for layer in (out["outputs"], out["aux_outputs"][0]):
        assert {k: tuple(v.shape) for k, v in layer.items()} == expected
        assert (layer["boxes"][..., 3:] >= layer["boxes"][..., :3]).all()
        assert torch.equal(layer["angle_continuous"], torch.zeros(2, 16))
        torch.testing.assert_close(layer["sem_cls_prob"].sum(-1), layer["objectness_prob"])
    torch.manual_seed(0)
    coloured = tiny_detector(preencoder="3detr", in_features=3)
    points = torch.cat([inputs["point_clouds"], torch.rand(2, 512, 3)], dim=-1)
    assert coloured(points, inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])["outputs"][
        "boxes"
    ].shape == (
        2,
        16,
        6,
    )
    with pytest.raises(ConfigError, match="xyz only"):
        tiny_detector(in_features=3)


def test_ball_query_takes_the_first_points_in_reach_and_pads_with_the_first():
    xyz = torch.tensor([[[0.0, 0, 0], [5, 0, 0], [0.1, 0, 0], [0.2, 0, 0], [0.3, 0, 0]]])
    centres = torch.tensor([[[0.0, 0, 0], [5, 0, 0], [9, 0, 0]]])
    idx = ball_query(xyz, centres, radius=0.25, nsample=4)
    assert idx.tolist() == [[[0, 2, 3, 0], [1, 1, 1, 1], [0, 0, 0, 0]]]


def test_matcher_picks_the_cheapest_assignment_not_the_greedy_one():
    # giou cost 2, class cost 1 (3DETR's ScanNet): greedy takes (q0, g0) then (q1, g1) = -2.0 - 1.0 class;
    # the optimum is (q0, g1), (q1, g0) = -3.3 - 1.0; query 2 stays unmatched.
    outputs = {
        "sem_cls_prob": torch.full((1, 3, 2), 0.5),
        "objectness_prob": torch.ones(1, 3),
        "gious": torch.tensor([[[0.9, 0.8], [0.85, 0.1], [0.0, 0.0]]]),
        "center_dist": torch.zeros(1, 3, 2),
    }
    targets = {"gt_box_sem_cls_label": torch.tensor([[0, 1]]), "nactual_gt": torch.tensor([2])}
    match = HungarianMatcher()(outputs, targets)
    assert match.per_prop_gt_inds.tolist() == [[1, 0, 0]]
    assert match.proposal_matched_mask.tolist() == [[1.0, 1.0, 0.0]]


def test_axis_aligned_giou_matches_hand_computed_values():
    unit = [0.0, 0, 0, 1, 1, 1]
    pairs = [
        (unit, unit, 1.0),
        (unit, [2.0, 0, 0, 3, 1, 1], -1 / 3),  # disjoint: iou 0, union 2, enclosing 3
        ([0.0, 0, 0, 2, 2, 2], [0.5, 0.5, 0.5, 1.5, 1.5, 1.5], 1 / 8),  # nested: iou 1/8, enclosing = union
        ([0.0, 0, 0, 2, 1, 1], [1.0, 0, 0, 3, 1, 1], 1 / 3),  # half overlap: iou 1/3, enclosing = union
    ]
    a = torch.tensor([[p[0] for p in pairs]])
    b = torch.tensor([[p[1] for p in pairs]])
    giou = axis_aligned_giou(a, b)
    torch.testing.assert_close(giou.diagonal(dim1=1, dim2=2), torch.tensor([[p[2] for p in pairs]]))
    masked = axis_aligned_giou(a, b, present=torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert (masked[..., 3] == 0).all() and torch.equal(masked[..., :3], giou[..., :3])


def test_a_few_adamw_steps_on_one_scene_reduce_the_set_loss():
    torch.manual_seed(0)
    inputs, targets = batch()
    model = tiny_detector(dropout=0.0, mlp_dropout=0.0)
    criterion = SetCriterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(inputs["point_clouds"], inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])
        loss, parts = criterion(out, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert {"loss_sem_cls", "loss_center", "loss_size", "loss_giou", "loss_angle_reg", "loss_giou_0"} <= set(parts)
    single = {k: v for k, v in parts.items() if not k[-1].isdigit() and k != "loss_cardinality"}
    assert np.isfinite([v.item() for v in single.values()]).all()


def test_init_encoder_loads_every_encoder_tensor_into_the_detector(tmp_path):
    source = PointEncoder.from_config(TINY)
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "e.pth")
    model = tiny_detector()
    report = init_encoder(model.MAE_encoder, tmp_path / "e.pth")
    assert report["used"] == len(source.state_dict()) and report["missing"] == []
    torch.testing.assert_close(model.MAE_encoder.state_dict(), source.state_dict())


def test_augmentation_keeps_boxes_tight_around_the_transformed_object_points():
    cfg = SampleConfig(num_points=2076, use_color=True, use_random_cuboid=False)  # every point, in random order
    flips = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        xyz, rgb = scene(rng)
        sample = scene_sample(xyz, rgb, BOXES, np.array([1, 3]), rng, augment=True, cfg=cfg)
        points = sample["point_clouds"]
        object_id = np.rint((points[:, 3] * 256 + 109.8) / 40).astype(int)
        for i, box in enumerate(sample["boxes"]):
            own = points[object_id == i + 1, :3]
            np.testing.assert_allclose(box, np.concatenate([own.min(0), own.max(0)]), atol=1e-5)
        flips.add(tuple(np.sign(sample["boxes"][:, 0] + sample["boxes"][:, 3]) < 0))
        np.testing.assert_allclose(sample["point_cloud_dims_min"], points[:, :3].min(0))
    assert len(flips) > 1  # both flipped and unflipped draws were checked


def test_sampling_is_reproducible_for_a_seed_and_crops_keep_boxes_with_their_classes():
    def draw(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        xyz, rgb = scene(np.random.default_rng(0))
        cfg = SampleConfig(num_points=512, random_cuboid_min_points=300, use_height=True)
        return scene_sample(xyz, rgb, BOXES, np.array([1, 3]), rng, augment=True, cfg=cfg)

    first, again, other = draw(3), draw(3), draw(4)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["point_clouds"], other["point_clouds"])
    assert first["point_clouds"].shape == (512, 4) and len(first["boxes"]) == len(first["classes"]) >= 1
    assert set(first["classes"].tolist()) <= {1, 3}


def test_targets_are_padded_normalised_and_refuse_too_many_boxes():
    lo, hi = torch.zeros(1, 3), torch.tensor([[4.0, 4.0, 2.0]])
    targets = build_targets([BOXES], [np.array([1, 3])], lo, hi, max_num_obj=4)
    assert targets["gt_box_present"].tolist() == [[1.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(targets["gt_box_centers_normalized"][0, 0], torch.tensor([0.25, 0.25, 0.25]))
    torch.testing.assert_close(targets["gt_box_sizes_normalized"][0, 1], torch.tensor([0.25, 0.325, 1.0]))
    assert targets["gt_box_sem_cls_label"].tolist() == [[1, 3, 0, 0]]
    with pytest.raises(DataError, match="scene0000_00 has 2 boxes"):
        build_targets([BOXES], [np.array([1, 3])], lo, hi, max_num_obj=1, names=["scene0000_00"])
