"""Teacher kinds behind one interface: seeded random builds, official-format local weights, refusals."""

from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pkd.common.errors import ConfigError, WeightsError
from pkd.common.geometry import teacher_crop_box
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.teacher import ClipCapMLP, TeacherConfig, build_teacher
from pkd.preprocess.teachers import KIND_HELP, KINDS, build_target_teacher
from pkd.preprocess.torchvision_compat import ensure_torchvision, import_open_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPEN_CLIP = "ViT-S-32"  # the smallest ViT image tower open_clip lists (width 384, 12 layers, 7x7 grid)
# kind -> the arrays it gives with patch tokens, and their shapes
EXPECTED = {
    "clipcap": {"prefix": (10, 768), "clip_embed": (512,), "patch_tokens": (49, 512)},
    f"open_clip:{OPEN_CLIP}": {"embed": (384,), "patch_tokens": (49, 384)},
    "dinov2:small": {"cls": (384,), "patch_tokens": (256, 384)},
}


def batch(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def frame(scannet_scene) -> Image.Image:
    return Image.open(scannet_scene / "color" / "0.jpg")


# three ViT-B/32 builds take over 10 s here; test_clipcap_kind_is_build_teacher covers clipcap in the quick suite
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "clipcap" else k for k in EXPECTED])
def test_random_teacher_is_seeded_marked_and_matches_its_arrays(kind, caplog):
    with caplog.at_level(logging.WARNING):
        teacher = build_target_teacher(kind, random=True, seed=3, patch_tokens=True)
    assert "RANDOM TEACHER (seed 3)" in caplog.text
    x = batch(teacher.transform.center_crop)
    out = teacher.encode(x)
    assert {a.name: a.shape for a in teacher.arrays} == EXPECTED[kind]
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, *s) for k, s in EXPECTED[kind].items()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())

    again = build_target_teacher(kind, random=True, seed=3, patch_tokens=True).encode(x)
    other = build_target_teacher(kind, random=True, seed=4, patch_tokens=True).encode(x)
    for name in out:
        assert torch.equal(out[name], again[name]), name
        assert not torch.allclose(out[name], other[name]), name

    identity = json.loads(json.dumps(teacher.identity))
    assert identity == teacher.identity
    assert identity["kind"] == kind and identity["random"] is True and identity["seed"] == 3
    assert identity["precision"] == "fp32" and identity["library_version"]
    assert identity["arrays"] == {a.name: a.meaning for a in teacher.arrays}
    assert "device" not in identity


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_transform_shows_the_model_the_crop_the_store_maps_points_into(kind):
    """A frame black but for a white band just inside ``teacher_crop_box``: the model sees the band at its edges."""
    teacher = build_target_teacher(kind, random=True)
    t = teacher.transform
    width, height, band = 1296, 968, 0.06  # ScanNet's colour frames; the band is 6 % of the box
    u0, v0, u1, v1 = teacher_crop_box(width, height, t.image_size, t.center_crop)
    du, dv = band * (u1 - u0), band * (v1 - v0)
    frame = np.zeros((height, width, 3), np.uint8)
    frame[round(v0) : round(v1), round(u0) : round(u1)] = 255
    frame[round(v0 + dv) : round(v1 - dv), round(u0 + du) : round(u1 - du)] = 0
    x = teacher.preprocess(Image.fromarray(frame))
    grey = (x * torch.tensor(t.std)[:, None, None] + torch.tensor(t.mean)[:, None, None]).mean(0)
    c, ring = t.center_crop, round(band * t.center_crop)
    assert x.shape == (3, c, c)
    for edge in (grey[2 : ring - 2], grey[c - ring + 2 : c - 2], grey[:, 2 : ring - 2], grey[:, c - ring + 2 : c - 2]):
        assert edge.mean() > 0.9
    assert grey[ring + 3 : c - ring - 3, ring + 3 : c - ring - 3].mean() < 0.05


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_patch_tokens_only_on_request(kind):
    teacher = build_target_teacher(kind, random=True, seed=0)
    expected = {k: s for k, s in EXPECTED[kind].items() if k != "patch_tokens"}
    assert {a.name: a.shape for a in teacher.arrays} == expected
    assert set(teacher.encode(batch(teacher.transform.center_crop))) == set(expected)


def test_clipcap_kind_is_build_teacher(frame):
    cfg = TeacherConfig(kind="random", seed=5, patch_tokens=True)
    reference = build_teacher(cfg)
    teacher = build_target_teacher("clipcap", random=True, seed=5, patch_tokens=True)
    x = teacher.preprocess(frame)[None]
    assert torch.equal(x, reference.transform(frame)[None])
    out, ref = teacher.encode(x), reference.encode(x)
    assert torch.equal(out["prefix"], ref.prefix) and torch.equal(out["clip_embed"], ref.clip_embed)
    assert torch.equal(out["patch_tokens"], ref.patch_tokens)
    assert teacher.transform == reference.identity.transform
    extra = {"kind", "library", "library_version", "arrays"}
    assert {k: v for k, v in teacher.identity.items() if k not in extra} == {
        k: v for k, v in reference.identity.comparable().items() if k != "kind"
    }


@pytest.mark.slow
def test_clipcap_kind_loads_a_weights_folder(tmp_path, frame):
    torch.manual_seed(11)
    clip = import_open_clip().create_model("ViT-B-32-quickgelu", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "ViT-B-32.pt")
    torch.save(
        {f"clip_project.{k}": v for k, v in ClipCapMLP().state_dict().items()}, tmp_path / "conceptual_weights.pt"
    )
    teacher = build_target_teacher("clipcap", weights=str(tmp_path))
    reference = build_teacher(
        TeacherConfig(
            clip_weights=str(tmp_path / "ViT-B-32.pt"), clipcap_weights=str(tmp_path / "conceptual_weights.pt")
        )
    )
    x = teacher.preprocess(frame)[None]
    assert torch.equal(teacher.encode(x)["prefix"], reference.encode(x).prefix)
    assert teacher.identity["random"] is False and teacher.identity["seed"] is None
    assert teacher.identity["clip_weights_sha256"] == tw.sha256_file(tmp_path / "ViT-B-32.pt")
    assert teacher.identity["clipcap_weights_sha256"] == tw.sha256_file(tmp_path / "conceptual_weights.pt")
    with pytest.raises(WeightsError, match="not a folder"):
        build_target_teacher("clipcap", weights=str(tmp_path / "ViT-B-32.pt"))


@pytest.fixture(scope="module")
def open_clip_model():
    """A full open_clip model (text tower included) with seeded random weights: the 'published' checkpoint."""
    torch.manual_seed(21)
    model, _, preprocess = import_open_clip().create_model_and_transforms(OPEN_CLIP, pretrained=None)
    return model.eval(), preprocess


@pytest.mark.parametrize("fmt", ["torch.save", "safetensors", "visual only"])
def test_open_clip_local_weights_reproduce_the_source_model(open_clip_model, fmt, tmp_path, frame):
    from safetensors.torch import save_file

    model, preprocess = open_clip_model
    state = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(model.visual.state_dict() if fmt == "visual only" else state, path)
    teacher = build_target_teacher(f"open_clip:{OPEN_CLIP}", weights=str(path), patch_tokens=True)
    x = teacher.preprocess(frame)[None]
    assert torch.equal(x, preprocess(frame)[None])  # open_clip's own eval transform
    out = teacher.encode(x)
    with torch.no_grad():
        embed = model.encode_image(x)
        model.visual.output_tokens = True
        _, tokens = model.visual(x)
        model.visual.output_tokens = False
    assert torch.equal(out["embed"], embed)
    assert torch.equal(out["patch_tokens"], tokens @ model.visual.proj)
    identity = teacher.identity
    assert identity["random"] is False and identity["seed"] is None and identity["weights"] == path.name
    assert identity["weights_sha256"] == {path.name: tw.sha256_file(path)}
    assert identity["transform"]["mean"] == list(import_open_clip().OPENAI_DATASET_MEAN)


def test_open_clip_checkpoint_missing_keys_is_a_weights_error(open_clip_model, tmp_path):
    state = dict(open_clip_model[0].state_dict())
    del state["visual.ln_post.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        build_target_teacher(f"open_clip:{OPEN_CLIP}", weights=str(path))
    assert str(path) in str(err.value) and "ln_post.weight" in str(err.value) and "missing" in str(err.value)
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_target_teacher(f"open_clip:{OPEN_CLIP}", weights=str(path))


def test_open_clip_tag_takes_that_tags_preprocessing(monkeypatch, frame):
    open_clip = import_open_clip()
    tag_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "shortest"}
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda model: ["webby"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: tag_cfg)
    teacher = build_target_teacher(f"open_clip:{OPEN_CLIP}@webby", random=True)
    reference = open_clip.image_transform(224, is_train=False, mean=0.5, std=0.5, interpolation="bilinear")
    assert torch.equal(teacher.preprocess(frame), reference(frame))
    assert teacher.transform.mean == (0.5, 0.5, 0.5) and teacher.transform.interpolation == "bilinear"
    assert teacher.identity["pretrained_tag"] == "webby" and teacher.identity["transform"]["std"] == [0.5] * 3


def test_open_clip_tags_that_squash_or_do_not_exist_are_refused():
    with pytest.raises(ConfigError, match="'squash'"):  # refused before the (large) model is built
        build_target_teacher("open_clip:ViT-H-14@dfn5b", random=True)
    with pytest.raises(ConfigError, match="laion2b_s34b_b88k"):
        build_target_teacher("open_clip:ViT-B-16@nope", random=True)


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A random DINOv2-small saved as Hugging Face writes a published one (config.json + model.safetensors)."""
    ensure_torchvision()
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(31)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518)
    model = Dinov2Model(config).eval()
    folder = tmp_path_factory.mktemp("dinov2-small")
    model.save_pretrained(str(folder))
    return model, folder


def test_dinov2_local_folder_reproduces_the_source_model(dinov2_folder, frame):
    from transformers import BitImageProcessorPil

    model, folder = dinov2_folder
    teacher = build_target_teacher("dinov2:small", weights=str(folder), patch_tokens=True)
    x = teacher.preprocess(frame)[None]
    # facebook/dinov2-*'s preprocessor_config.json, on transformers' PIL backend (its default torchvision
    # backend resizes tensors and differs by up to one grey level)
    official = BitImageProcessorPil(
        size={"shortest_edge": 256},
        resample=3,
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    reference = official(frame, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(x, reference, atol=1e-6, rtol=0)
    out = teacher.encode(x)
    with torch.no_grad():
        source = model(pixel_values=x)
    assert torch.equal(out["cls"], source.pooler_output)
    assert torch.equal(out["patch_tokens"], source.last_hidden_state[:, 1:])
    hashes = teacher.identity["weights_sha256"]
    assert hashes["model.safetensors"] == tw.sha256_file(folder / "model.safetensors")
    assert teacher.identity["random"] is False and teacher.identity["architecture"]["hidden_size"] == 384


def test_dinov2_half_checkpoint_runs_in_float32(dinov2_folder, tmp_path):
    model, _ = dinov2_folder
    half = tmp_path / "half"
    copy.deepcopy(model).half().save_pretrained(str(half))
    teacher = build_target_teacher("dinov2:small", weights=str(half))
    x = batch(224)
    with torch.no_grad():
        source = model(pixel_values=x).pooler_output
    torch.testing.assert_close(teacher.encode(x)["cls"], source, atol=0.05, rtol=0.01)


def test_dinov2_wrong_folders_are_weights_errors(dinov2_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = dinov2_folder
    with pytest.raises(WeightsError, match="not the base size"):
        build_target_teacher("dinov2:base", weights=str(folder))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in state if k.endswith("layernorm.weight"))
    del state[dropped]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(WeightsError) as err:
        build_target_teacher("dinov2:small", weights=str(broken))
    assert str(broken) in str(err.value) and "missing keys" in str(err.value)
    with pytest.raises(WeightsError, match="config.json"):
        build_target_teacher("dinov2:small", weights=str(tmp_path))


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("siglip", "dinov2:<size>"),
        ("clipcap:ViT-B-32", "open_clip:<model>"),
        ("dinov2", "dinov2:<size>"),
        ("dinov2:huge", "small, base, large, giant"),
        ("open_clip:ViT-B-99", "nearest: ViT-B-"),
    ],
)
def test_unknown_kind_model_or_size_names_the_choices(kind, named):
    with pytest.raises(ConfigError, match="unknown") as err:
        build_target_teacher(kind, random=True)
    assert named in str(err.value) and kind.split(":")[-1] in str(err.value)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_weights_or_random_weights_and_precision_checks(kind):
    with pytest.raises(WeightsError, match="--random-weights") as err:
        build_target_teacher(kind)
    assert "--weights" in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        build_target_teacher(kind, weights="w.pt", random=True)
    with pytest.raises(ConfigError, match="fp16"):
        build_target_teacher(kind, random=True, precision="fp16")


def test_kind_help_lists_every_kind():
    assert KIND_HELP.splitlines() == [f"{k.usage}: {k.help}" for k in KINDS.values()]
    assert [k.usage for k in KINDS.values()] == ["clipcap", "open_clip:<model>[@<tag>]", "dinov2:<size>"]
