"""Student modules: shapes, Point-MAE key names, tokenizer correctness, export/import round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pkd.common.errors import ConfigError, WeightsError
from pkd.train.checkpoint import atomic_save
from pkd.train.encoder import EncoderConfig, PointEncoder, tokenizer
from pkd.train.export import encoder_state, load_pointmae_checkpoint
from pkd.train.model import Student, StudentConfig
from pkd.train.tokenizer import Group, farthest_point_sample, knn
from pkd.train.variants import VARIANTS

from _cli import TINY_STUDENT as TINY
from store_factory import clipcap_target_shape


def pointmae_encoder_keys(depth: int) -> set[str]:
    """The state-dict keys of Point-MAE's MaskTransformer (models/Point_MAE.py), written out by hand."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {
        f"encoder.{conv}.{i}.{p}" for conv in ("first_conv", "second_conv") for i in (0, 3) for p in ("weight", "bias")
    }
    keys |= {f"encoder.{conv}.1.{p}" for conv in ("first_conv", "second_conv") for p in bn}
    keys |= {f"pos_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    keys |= {"norm.weight", "norm.bias"}
    for i in range(depth):
        b = f"blocks.blocks.{i}"
        keys |= {f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight", f"{b}.attn.proj.bias"}
        keys |= {f"{b}.{m}.{p}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    return keys


def test_full_size_encoder_has_pointmae_keys_and_shapes():
    state = PointEncoder().state_dict()
    assert set(state) == pointmae_encoder_keys(12)
    assert state["encoder.first_conv.0.weight"].shape == (128, 3, 1)
    assert state["encoder.second_conv.0.weight"].shape == (512, 512, 1)
    assert state["encoder.second_conv.3.weight"].shape == (384, 512, 1)
    assert state["pos_embed.2.weight"].shape == (384, 128)
    assert state["blocks.blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert state["blocks.blocks.11.mlp.fc1.weight"].shape == (1536, 384)


@pytest.mark.parametrize("variant", VARIANTS)
def test_student_prefixes_and_output_shapes(variant):
    student = Student(StudentConfig(**TINY, variant=variant, target_shape=clipcap_target_shape(variant)))
    prefixes = {k.split(".")[0] for k in student.state_dict()}
    assert not any("cls_token" in k or "cls_pos" in k for k in student.state_dict())
    expected = {"MAE_encoder"}
    expected |= {"concept"} if variant in ("distill", "clip-target", "recon+distill") else set()
    expected |= {"head"} if variant != "recon" else set()
    expected |= {"MAE_decoder"} if variant.startswith("recon") else set()
    assert prefixes == expected
    assert {k[len("MAE_encoder.") :] for k in encoder_state(student.state_dict())} == pointmae_encoder_keys(2)
    points = torch.randn(3, 128, 3)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :9] = True
    out = student(points, mask)
    assert out.centre_idx.shape == (3, 16)
    pred_shape = {
        "distill": (3, 10, 768),
        "no-concept": (3, 10, 768),
        "recon+distill": (3, 10, 768),
        "clip-target": (3, 512),
        "local": (3, 16, 512),
    }.get(variant)
    assert (out.pred is None) == (pred_shape is None)
    if pred_shape:
        assert out.pred.shape == pred_shape
    if variant.startswith("recon"):
        assert out.recon_pred.shape == out.recon_target.shape == (3, 9, 8, 3)


def fps_reference(xyz: np.ndarray, num: int) -> list[int]:
    chosen, dist = [0], np.full(len(xyz), np.inf)
    for _ in range(num - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(dist.argmax()))
    return chosen


def test_fps_matches_bruteforce_reference():
    xyz = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(0))
    idx = farthest_point_sample(xyz, 20)
    for b in range(2):
        assert idx[b].tolist() == fps_reference(xyz[b].numpy(), 20)


def test_knn_matches_bruteforce_and_includes_centre():
    xyz = torch.rand(2, 100, 3, generator=torch.Generator().manual_seed(1))
    centres = farthest_point_sample(xyz, 5)
    idx = knn(xyz, centres, 7)
    for b in range(2):
        for g in range(5):
            d = ((xyz[b] - xyz[b, centres[b, g]]) ** 2).sum(-1)
            assert set(idx[b, g].tolist()) == set(torch.argsort(d)[:7].tolist())
            assert idx[b, g, 0] == centres[b, g]


def test_group_patches_are_relative_to_centres():
    xyz = torch.randn(2, 64, 3)
    patches, centres, centre_idx = Group(8, 4)(xyz)
    assert patches.shape == (2, 8, 4, 3) and centres.shape == (2, 8, 3)
    assert torch.equal(centres, xyz[torch.arange(2)[:, None], centre_idx])
    assert torch.all(patches[:, :, 0] == 0)


def test_export_round_trip_gives_identical_encoder_outputs(tmp_path):
    cfg = StudentConfig(**TINY, target_shape=clipcap_target_shape("distill"))
    trained = Student(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "encoder.pth"
    atomic_save({"base_model": encoder_state(trained.state_dict())}, path)
    fresh = Student(cfg)
    report = load_pointmae_checkpoint(path, fresh)
    assert report.missing == [] and report.unexpected == []
    assert len(report.used) == len(pointmae_encoder_keys(2))
    trained.eval(), fresh.eval()
    patches, centres, _ = trained.group_divider(torch.randn(2, 128, 3))
    assert torch.equal(trained.MAE_encoder(patches, centres)[0], fresh.MAE_encoder(patches, centres)[0])


def test_pointmae_loader_logic_accepts_export(tmp_path):
    """Mirror PointTransformer.load_model_from_ckpt: strip prefixes, load non-strictly, nothing unexpected."""
    state = encoder_state(Student(StudentConfig(**TINY, target_shape=(4,))).state_dict())
    base = {k.replace("module.", ""): v for k, v in {"module." + k: v for k, v in state.items()}.items()}
    base = {k[len("MAE_encoder.") :] if k.startswith("MAE_encoder") else k: v for k, v in base.items()}
    incompatible = PointEncoder(48, 2, 4).load_state_dict(base, strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []


def test_load_accepts_finetune_style_and_refuses_foreign(tmp_path):
    encoder = PointEncoder(48, 2, 4)
    finetune = {"model": {f"module.base_model.{k}": v for k, v in encoder.state_dict().items()}}
    finetune["model"]["module.base_model.cls_token"] = torch.zeros(1, 1, 48)
    torch.save(finetune, tmp_path / "ft.pth")
    report = load_pointmae_checkpoint(tmp_path / "ft.pth", PointEncoder(48, 2, 4))
    assert report.unexpected == ["cls_token"] and report.missing == []
    torch.save({"base_model": {"resnet.conv1.weight": torch.zeros(3)}}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="no Point-MAE encoder weights"):
        load_pointmae_checkpoint(tmp_path / "foreign.pth", PointEncoder(48, 2, 4))
    with pytest.raises(WeightsError, match="another size"):
        load_pointmae_checkpoint(tmp_path / "ft.pth", PointEncoder(96, 2, 4))


def test_encoder_computes_pointmae_conv1d_forward():
    """The channels-last forward equals Point-MAE's Conv1d forward run on the same modules (train and eval)."""
    encoder = PointEncoder(48, 1, 4).encoder
    patches = torch.randn(2, 5, 8, 3)

    def reference(groups):
        b, g, n, _ = groups.shape
        feature = encoder.first_conv(groups.reshape(b * g, n, 3).transpose(2, 1))
        glob = torch.max(feature, dim=2, keepdim=True)[0]
        feature = encoder.second_conv(torch.cat([glob.expand(-1, -1, n), feature], dim=1))
        return torch.max(feature, dim=2)[0].reshape(b, g, -1)

    for mode in (True, False):
        encoder.train(mode)
        torch.testing.assert_close(encoder(patches), reference(patches), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (dict(dim=0), "dim 0: must be at least 1"),
        (dict(depth=0, heads=0), "depth 0, heads 0: must be at least 1"),
        (dict(dim=50, heads=4), "dim 50 is not divisible by heads 4"),
        (dict(drop_path=1.0), r"drop_path 1.0 must lie in \[0, 1\)"),
        (dict(drop_path=-0.1), r"drop_path -0.1 must lie in \[0, 1\)"),
    ],
)
def test_encoder_config_refuses_bad_sizes_naming_them(sizes, message):
    from pkd.train.downstream.config import FinetuneConfig
    from pkd.train.downstream.probe import ProbeConfig

    for build in (
        EncoderConfig,
        StudentConfig,
        lambda **kw: FinetuneConfig.for_task("modelnet40", "x", **kw),
        lambda **kw: ProbeConfig(data="x", **kw),
    ):
        with pytest.raises(ConfigError, match=message):
            build(**sizes)


def test_every_model_builds_the_same_encoder_from_one_encoder_config():
    """Student, classifier, both segmenters and the probe: one EncoderConfig → identical encoder keys,
    shapes and tokenizer."""
    from pkd.train.downstream.models import PartSegmenter, PointClassifier
    from pkd.train.downstream.scannet_seg import SceneSegmenter

    sizes = EncoderConfig(num_group=16, group_size=8, dim=48, depth=3, heads=4, drop_path=0.0)
    student = Student(
        StudentConfig(**dataclasses.asdict(sizes), num_points=128, num_concepts=4, head_hidden=32, target_shape=(4,))
    )
    models = [student, PointClassifier(40, sizes), PartSegmenter(50, 16, sizes), SceneSegmenter(20, sizes)]
    expected = {k: v.shape for k, v in PointEncoder.from_config(sizes).state_dict().items()}
    assert set(expected) == pointmae_encoder_keys(3)
    for model in models:
        assert {k: v.shape for k, v in model.MAE_encoder.state_dict().items()} == expected, type(model).__name__
        assert (model.group_divider.num_group, model.group_divider.group_size) == (16, 8)
    probe_group = tokenizer(sizes)
    assert (probe_group.num_group, probe_group.group_size) == (16, 8)


def test_recorded_flat_student_config_still_loads():
    """Configs written before EncoderConfig (flat fields, the old order) rebuild the same StudentConfig; version 3
    adds the objective's weight and local pairing to the model section, read as they were (recon weight 1,
    centre pairing); version 4 the target set, read as the ClipCap prefix of (10, 768) they regressed."""
    from pkd.train.config import TrainConfig, upgrade_config

    recorded = {
        "num_points": 128,
        "num_group": 16,
        "group_size": 8,
        "dim": 48,
        "depth": 2,
        "heads": 4,
        "drop_path": 0.1,
        "num_concepts": 4,
        "concept_mlp_ratio": 1.0,
        "head": "flat",
        "head_hidden": 32,
        "decoder_depth": 3,
        "mask_ratio": 0.6,
        "variant": "distill",
    }
    cfg = TrainConfig.from_dict(upgrade_config({"store": "s", "recon_weight": 1.0, "model": recorded}))
    assert cfg.model == StudentConfig(**TINY, local_pairing="centre", target_shape=(10, 768))
    assert dataclasses.asdict(cfg.model) == {
        **recorded,
        "recon_weight": 1.0,
        "local_pairing": "centre",
        "targets": None,
        "target_shape": (10, 768),
    }
