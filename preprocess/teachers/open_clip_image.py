"""``open_clip:<model>[@<tag>]``: the image tower of any open_clip model, with its own eval transform.

Arrays: ``embed`` (D,) = ``encode_image`` unnormalised (``model.visual(x)``) and, on request,
``patch_tokens`` (T, D): the grid tokens after ``ln_post``, projected by ``visual.proj`` as
``pkd.preprocess.teacher`` does for ClipCap (plain ViT towers only). The transform is open_clip's
``image_transform_v2(get_model_preprocess_cfg(model), is_train=False)`` (open_clip ``factory.py``), with a
pretrained tag's mean/std/interpolation when ``@tag`` names one (``pretrained.py``); only shortest-side resizes
are taken, the one whose crop ``common.geometry.teacher_crop_box`` maps points into.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pkd.common.errors import ConfigError
from pkd.common.logs import demoted
from pkd.common.store import TransformAttrs
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.teacher import warn_random_teacher
from pkd.preprocess.teachers.base import (
    BuildOptions,
    ModuleTeacher,
    TargetArray,
    TeacherKind,
    choose,
    file_hashes,
    frozen,
    seeded,
)
from pkd.preprocess.torchvision_compat import import_open_clip

NAME = "open_clip"
EMBED_MEANING = "encode_image, unnormalised"
TOKENS_MEANING = "grid tokens after ln_post, projected by visual.proj"


def _source(model: str) -> str:
    return (
        f"an open_clip {model} checkpoint (state dict, .safetensors or OpenAI TorchScript file; "
        f"`open_clip.list_pretrained()` names the published ones)"
    )


def _visual_state(path: Path, model: str) -> dict[str, torch.Tensor]:
    state = tw.read_state_dict(path, f"open_clip {model} weights")
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return visual or state  # a full model's keys are visual.*; anything else is taken as the tower alone


def _load(visual: nn.Module, path: Path, model: str) -> None:
    tw.load_strictly(
        visual, _visual_state(path, model), path, f"open_clip {model}'s image tower", f"Get {_source(model)}"
    )


def _transform_attrs(cfg: dict[str, Any], transform: Any, spec: str) -> TransformAttrs:
    size = cfg["size"]
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ConfigError(f"teacher {spec}: non-square input {tuple(size)} is not supported; pick a square model.")
        size = size[0]
    _check_resize(cfg["resize_mode"], spec)
    return TransformAttrs(
        image_size=size,
        resize=f"shortest side to {size}",
        interpolation=cfg["interpolation"],
        center_crop=size,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        steps=tuple(getattr(t, "__name__", type(t).__name__) for t in transform.transforms),
    )


def _check_resize(mode: str, spec: str) -> None:
    if mode != "shortest":  # squash / longest-and-pad show the model another part of the frame
        raise ConfigError(
            f"teacher {spec}: open_clip resizes its images by {mode!r}; pkd maps points to the teacher's "
            "pixels for a shortest-side resize and centre crop only (common.geometry.teacher_crop_box); "
            "pick a model or tag whose resize_mode is 'shortest'."
        )


def _tag_preprocess(open_clip: ModuleType, model: str, tag: str, spec: str) -> dict[str, Any]:
    """create_model_and_transforms' image_* overrides for a pretrained tag's preprocessing (nothing fetched)."""
    if not tag:
        return {}
    tag = choose(tag, open_clip.list_pretrained_tags_by_model(model), f"open_clip pretrained tag of {model}", spec)
    cfg = open_clip.get_pretrained_cfg(model, tag)
    _check_resize(cfg.get("resize_mode", "shortest"), spec)
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
    return {arg: cfg[key] for key, arg in keys.items() if key in cfg}


def _check_tokens(open_clip: ModuleType, visual: nn.Module, spec: str) -> None:
    plain_vit = isinstance(visual, open_clip.transformer.VisionTransformer)
    if not plain_vit or visual.attn_pool is not None or visual.final_ln_after_pool or visual.proj is None:
        raise ConfigError(
            f"teacher {spec}: patch tokens are supported for plain ViT image towers (ln_post then proj) only; "
            "drop --patch-tokens or pick a ViT model."
        )


def _forward(visual: nn.Module, patch_tokens: bool):
    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not patch_tokens:
            return {"embed": visual(x)}
        embed, tokens = visual(x)
        return {"embed": embed, "patch_tokens": tokens @ visual.proj}

    return forward


def build(arg: str | None, opts: BuildOptions) -> ModuleTeacher:
    """The image tower of open_clip ``model[@tag]`` from a local checkpoint, or seeded random weights.

    ``@tag`` (a name ``open_clip.list_pretrained()`` pairs with the model) takes that tag's preprocessing
    (mean, std, interpolation) instead of the model config's, for checkpoints trained with another one.
    """
    spec = f"{NAME}:{arg}"
    open_clip = import_open_clip()
    name, _, tag = (arg or "").partition("@")
    model = choose(name, open_clip.list_models(), "open_clip model (open_clip.list_models())", spec)
    preprocess = _tag_preprocess(open_clip, model, tag, spec)
    device = opts.check(spec, _source(model))
    # open_clip warns that it loaded no pretrained weights: they are loaded below
    with seeded(opts.seed), demoted("", "No pretrained weights loaded"):
        clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=None, device="cpu", **preprocess)
    visual = clip.visual
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(clip))
    del clip  # the text tower is never used
    if opts.patch_tokens:
        _check_tokens(open_clip, visual, spec)
    hashes = None
    if opts.random:
        warn_random_teacher(f"open_clip {model}", opts.seed)
    else:
        path = Path(str(opts.weights))
        _load(visual, path, model)
        hashes = file_hashes([path])
    visual.output_tokens = opts.patch_tokens
    forward = _forward(frozen(visual, device), opts.patch_tokens)
    attrs = _transform_attrs(preprocess_cfg, transform, spec)
    with torch.no_grad():  # shapes from one forward: towers differ in width, grid and projection
        probe = forward(torch.zeros(1, 3, attrs.center_crop, attrs.center_crop, device=device))
    meanings = {"embed": EMBED_MEANING, "patch_tokens": TOKENS_MEANING}
    arrays = tuple(TargetArray(name, tuple(value.shape[1:]), meanings[name]) for name, value in probe.items())
    identity = {
        **opts.identity(spec, model, open_clip),
        "pretrained_tag": tag or None,
        "weights": Path(opts.weights).name if opts.weights else None,
        "weights_sha256": hashes,
        "arrays": {a.name: a.meaning for a in arrays},
        "transform": attrs.to_dict(),
    }
    return ModuleTeacher(identity, attrs, arrays, device, opts.precision, transform, forward)


KIND = TeacherKind(
    name=NAME,
    usage=f"{NAME}:<model>[@<tag>]",
    help="image tower of an open_clip model (e.g. open_clip:ViT-B-16@laion2b_s34b_b88k; @tag: that tag's "
    "preprocessing): embed (D,), patch_tokens (T,D) on request",
    takes_arg=True,
    build=build,
)
