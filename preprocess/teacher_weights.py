"""Where the teacher's weights come from: CLIP ViT-B/32 and the ClipCap checkpoint, read safely.

Plain state dicts are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling);
OpenAI's ``ViT-B-32.pt`` is a TorchScript archive and goes through ``torch.jit.load``, as open_clip
does. Every file is hashed so a store records exactly which weights produced its targets.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pkd.common.errors import WeightsError

CLIP_MODEL = "ViT-B-32-quickgelu"
CLIP_SOURCE = (
    "OpenAI CLIP ViT-B/32 weights: `--clip-weights openai` on a machine with internet (open_clip fetches them "
    "from the Hugging Face hub, timm/vit_base_patch32_clip_224.openai), or download "
    "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/"
    "ViT-B-32.pt and pass its path"
)
CLIPCAP_SOURCE = (
    "ClipCap MLP mapper weights: conceptual_weights.pt (Conceptual Captions) or coco_weights.pt from the "
    "Google-Drive links in the ClipCap README (https://github.com/rmokady/CLIP_prefix_caption)"
)
RANDOM_HINT = "or pass `--teacher random` for a seeded random teacher (tests and demos only)"
# Non-persistent buffers of old transformers' GPT-2 that ClipCap checkpoints still carry.
STALE_GPT_BUFFERS = (".attn.bias", ".attn.masked_bias")


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_strictly(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, hint: str) -> None:
    """Load ``state`` into ``module`` with every key matched; a WeightsError naming ``path``, the mismatched keys
    and ``hint`` (where to get the right file) otherwise."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another architecture
        raise WeightsError(f"weights file {path} does not fit {what}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights file {path} does not fit {what}: missing keys {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)}). "
            f"{hint}."
        )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict without executing pickled code.

    Accepts TorchScript archives, ``.safetensors`` and ``torch.save`` files (a state dict, or a dict
    holding one under ``state_dict``); a ``module.`` prefix from DataParallel is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} file {path} does not exist.")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = _torch_load(path)
    except (RuntimeError, OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise WeightsError(f"cannot read {what} file {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{what} file {path} holds no state dict of tensors (got {type(state).__name__}).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def resolve_clip_weights(spec: str | None) -> Path:
    """Turn ``--clip-weights`` (a path, or ``openai`` to download through open_clip) into a local file."""
    if spec is None:
        raise WeightsError(f"no CLIP weights given. Get {CLIP_SOURCE}; {RANDOM_HINT}.")
    if spec == "openai":
        from pkd.preprocess.torchvision_compat import import_open_clip

        pretrained = import_open_clip().pretrained
        try:
            path = pretrained.download_pretrained(pretrained.get_pretrained_cfg(CLIP_MODEL, "openai"))
        except Exception as exc:  # network, hub and cache errors all mean the same to the user
            raise WeightsError(
                f"open_clip could not fetch the OpenAI ViT-B/32 weights ({exc}). Get {CLIP_SOURCE}; {RANDOM_HINT}."
            ) from exc
        return Path(path)
    path = Path(spec)
    if not path.is_file():
        raise WeightsError(f"CLIP weights file {path} does not exist. Get {CLIP_SOURCE}; {RANDOM_HINT}.")
    return path


def visual_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The image-tower part (``visual.*``, prefix removed) of an OpenAI or open_clip CLIP checkpoint."""
    state = read_state_dict(path, "CLIP weights")
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(
            f"CLIP weights file {path} has no 'visual.*' keys (first keys: {list(state)[:5]}); "
            f"pass an OpenAI or open_clip {CLIP_MODEL} checkpoint. Get {CLIP_SOURCE}."
        )
    return visual


def clipcap_mlp_state_dict(
    path: str | Path, prefix_length: int, embed_dim: int, clip_dim: int
) -> dict[str, torch.Tensor]:
    """The MLP mapper (``clip_project.model.{0,2}``, prefix removed) of an official ClipCap checkpoint.

    A checkpoint of ClipCap's transformer mapper, or of another prefix length, is refused: pkd's
    targets are the MLP mapper's (prefix_length, embed_dim) prefix.
    """
    if not Path(path).is_file():
        raise WeightsError(f"ClipCap weights file {path} does not exist. Get {CLIPCAP_SOURCE}; {RANDOM_HINT}.")
    state = read_state_dict(path, "ClipCap weights")
    mapper = {k[len("clip_project.") :]: v for k, v in state.items() if k.startswith("clip_project.")}
    if "prefix_const" in mapper or any(k.startswith("transformer.") for k in mapper):
        found_prefix = mapper["prefix_const"].shape[0] if "prefix_const" in mapper else "unknown"
        clip_length = mapper["linear.weight"].shape[0] // embed_dim if "linear.weight" in mapper else "unknown"
        layers = len({k.split(".")[2] for k in mapper if k.startswith("transformer.layers.")})
        raise WeightsError(
            f"{path} holds ClipCap's transformer mapper (prefix length {found_prefix}, clip length {clip_length}, "
            f"{layers} layers); pkd needs the MLP mapper (prefix length {prefix_length}). Get {CLIPCAP_SOURCE}."
        )
    expected = {
        "model.0.weight": (embed_dim * prefix_length // 2, clip_dim),
        "model.0.bias": (embed_dim * prefix_length // 2,),
        "model.2.weight": (embed_dim * prefix_length, embed_dim * prefix_length // 2),
        "model.2.bias": (embed_dim * prefix_length,),
    }
    if set(mapper) != set(expected):
        raise WeightsError(
            f"{path}: expected ClipCap MLP mapper keys clip_project.{{{', '.join(sorted(expected))}}}, "
            f"found {sorted('clip_project.' + k for k in mapper) or 'none'}. Get {CLIPCAP_SOURCE}."
        )
    for key, shape in expected.items():
        if tuple(mapper[key].shape) != shape:
            found = mapper["model.2.bias"].shape[0] / embed_dim
            raise WeightsError(
                f"{path}: clip_project.{key} has shape {tuple(mapper[key].shape)}, expected {shape} "
                f"(MLP mapper with prefix length {prefix_length}; this one maps to {found:g} tokens "
                f"of {embed_dim}). Get {CLIPCAP_SOURCE}."
            )
    return {k: v.float() for k, v in mapper.items()}


def gpt_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The GPT-2 part (``gpt.*``, prefix removed, stale attention buffers dropped) of a ClipCap checkpoint."""
    if not Path(path).is_file():
        raise WeightsError(f"ClipCap weights file {path} does not exist. Get {CLIPCAP_SOURCE}.")
    state = read_state_dict(path, "ClipCap weights")
    gpt = {k[len("gpt.") :]: v for k, v in state.items() if k.startswith("gpt.") and not k.endswith(STALE_GPT_BUFFERS)}
    if "transformer.wte.weight" not in gpt:
        raise WeightsError(
            f"{path} has no GPT-2 weights (gpt.transformer.wte.weight missing); pass the full "
            f"ClipCap checkpoint. Get {CLIPCAP_SOURCE}."
        )
    return gpt
