"""``dinov2:<size>``: DINOv2 (transformers ``Dinov2Model``), CLS and patch features.

Arrays: ``cls`` (D,) = ``pooler_output`` (the layer-normed CLS token) and, on request, ``patch_tokens``
(256, D) = ``last_hidden_state[:, 1:]`` (16 x 16 patches of 14 px at 224). Sizes are the official
``facebook/dinov2-{small,base,large,giant}`` ``config.json`` files; the transform is their
``preprocessor_config.json`` (BitImageProcessor: shortest side to 256, bicubic; centre crop 224; ImageNet
mean/std), the same as DINOv2's own ``make_classification_eval_transform`` (``dinov2/data/transforms.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from pkd.common.errors import WeightsError
from pkd.common.store import TransformAttrs
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
from pkd.preprocess.torchvision_compat import ensure_torchvision

NAME = "dinov2"
# facebook/dinov2-<size>/config.json: what differs between sizes (all: patch 14, image_size 518, mlp_ratio 4,
# layerscale 1.0, layer_norm_eps 1e-6, qkv_bias)
SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "use_swiglu_ffn": False},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "use_swiglu_ffn": False},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "use_swiglu_ffn": False},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
}
COMMON: dict[str, Any] = {
    "image_size": 518,
    "patch_size": 14,
    "mlp_ratio": 4,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
}
RESIZE, CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
RECORDED = ("patch_size", "mlp_ratio", "layerscale_value", "layer_norm_eps", "qkv_bias", "hidden_act")


def _source(size: str) -> str:
    return (
        f"a Hugging Face folder of facebook/dinov2-{size} (config.json + model.safetensors, e.g. "
        f"`huggingface-cli download facebook/dinov2-{size} --local-dir DIR`)"
    )


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _transform() -> tuple[Any, TransformAttrs]:
    transforms = ensure_torchvision().transforms
    steps = transforms.Compose(
        [
            _rgb,
            transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(CROP),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    attrs = TransformAttrs(
        image_size=RESIZE,
        resize=f"shortest side to {RESIZE}",
        interpolation="bicubic",
        center_crop=CROP,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        steps=tuple(getattr(t, "__name__", type(t).__name__) for t in steps.transforms),
    )
    return steps, attrs


def _from_folder(folder: Path, size: str) -> tuple[Any, list[Path]]:
    from transformers import Dinov2Model

    if not (folder / "config.json").is_file():
        raise WeightsError(f"teacher dinov2:{size}: {folder} holds no config.json. Get {_source(size)}.")
    try:
        # float32 whatever the checkpoint holds: half precisions run through autocast, as for every kind
        loaded: Any = Dinov2Model.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"teacher dinov2:{size}: cannot load {folder}: {exc}. Get {_source(size)}.") from exc
    model, info = loaded
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        shown = "; ".join(f"{k.replace('_', ' ')} {sorted(map(str, v))[:5]} ({len(v)})" for k, v in bad.items())
        raise WeightsError(f"teacher dinov2:{size}: weights in {folder} do not fit Dinov2Model: {shown}.")
    found = {k: getattr(model.config, k) for k in SIZES[size]}
    if found != SIZES[size]:
        raise WeightsError(f"teacher dinov2:{size}: {folder} holds a DINOv2 of {found}, not the {size} size.")
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) + [folder / "config.json"]
    return model, files


def _forward(model: Any, patch_tokens: bool):
    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(pixel_values=x)
        arrays = {"cls": out.pooler_output}
        if patch_tokens:
            arrays["patch_tokens"] = out.last_hidden_state[:, 1:]
        return arrays

    return forward


def build(size: str | None, opts: BuildOptions) -> ModuleTeacher:
    """DINOv2 of an official size from a local Hugging Face folder, or seeded random weights."""
    spec = f"{NAME}:{size}"
    size = choose(size, tuple(SIZES), "DINOv2 size", spec)
    device = opts.check(spec, _source(size))
    ensure_torchvision()  # transformers imports torchvision's transforms
    import transformers

    hashes = None
    if opts.random:
        with seeded(opts.seed):
            model = transformers.Dinov2Model(transformers.Dinov2Config(**SIZES[size], **COMMON))
        warn_random_teacher(f"DINOv2 {size}", opts.seed)
    else:
        model, files = _from_folder(Path(str(opts.weights)), size)
        hashes = file_hashes(files)
    image_transform, attrs = _transform()
    config = model.config
    width, grid = config.hidden_size, CROP // cast(int, config.patch_size)
    arrays = [TargetArray("cls", (width,), "pooler_output: layer-normed CLS token")]
    if opts.patch_tokens:
        arrays.append(TargetArray("patch_tokens", (grid * grid, width), f"last_hidden_state[:, 1:], {grid}x{grid}"))
    identity = {
        **opts.identity(spec, f"facebook/dinov2-{size}", transformers),
        "architecture": {**SIZES[size], **{k: getattr(config, k) for k in RECORDED}},
        "weights": Path(opts.weights).name if opts.weights else None,
        "weights_sha256": hashes,
        "arrays": {a.name: a.meaning for a in arrays},
        "transform": attrs.to_dict(),
    }
    forward = _forward(frozen(model, device), opts.patch_tokens)
    return ModuleTeacher(identity, attrs, tuple(arrays), device, opts.precision, image_transform, forward)


KIND = TeacherKind(
    name=NAME,
    usage=f"{NAME}:<size>",
    help=f"DINOv2 via transformers, size {'|'.join(SIZES)}: cls (D,), patch_tokens (256,D) on request",
    takes_arg=True,
    build=build,
)
