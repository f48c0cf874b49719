"""Point-MAE's finetuning models around pkd's ``PointEncoder``, and encoder initialisation from ``--init``.

``PointClassifier`` is Point-MAE's ``PointTransformer``: a learned cls token (with its own positional
embedding) is prepended to the patch tokens, and the head reads ``[cls, max over patch tokens]`` (2·C) →
256 → 256 → classes with BatchNorm, ReLU and dropout 0.5.

``PartSegmenter`` is Point-MAE's ``segmentation/models/pt.py``: the outputs of three blocks (3, 7, 11 for
depth 12; in general ``fetch_layers(depth)``, evenly spaced and ending at the last block), each through the
encoder's final LayerNorm, are concatenated (3·C); their max and mean over tokens plus a 64-d embedding of
the one-hot category form a global feature; the token features are propagated to every point by 3-NN
inverse-squared-distance interpolation (PointNet++ feature propagation, with xyz as skip feature); a
per-point MLP 3392 → 512 → 256 → 50 (for C = 384) gives part logits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pkd.common.errors import WeightsError
from pkd.train.checkpoint import LAST
from pkd.train.encoder import EncoderConfig, PointEncoder, init_weights, tokenizer
from pkd.train.export import LoadReport, checkpoint_provenance, load_pointmae_checkpoint
from pkd.train.tokenizer import gather_points

SCRATCH = "scratch"
log = logging.getLogger(__name__)


def run_blocks(
    encoder: PointEncoder,
    patches: torch.Tensor,
    centres: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Every block's raw output for patch tokens, optionally after a prepended (token, positional) pair."""
    tokens, pos = encoder.encoder(patches), encoder.pos_embed(centres)
    if prefix is not None:
        batch = tokens.shape[0]
        tokens = torch.cat([prefix[0].expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([prefix[1].expand(batch, -1, -1), pos], dim=1)
    return encoder.blocks(tokens, pos)


def fetch_layers(depth: int) -> tuple[int, int, int]:
    """Three evenly spaced block indices ending at the last block: (3, 7, 11) for depth 12, (0, 1, 3) for 4."""
    if depth < 3:
        raise WeightsError(f"part segmentation reads three encoder blocks; depth {depth} has fewer. Use --depth ≥ 3.")
    return tuple((i + 1) * depth // 3 - 1 for i in range(3))  # type: ignore[return-value]


class PointClassifier(nn.Module):
    """Tokenizer → cls token + ``MAE_encoder`` → Point-MAE's classification head."""

    def __init__(self, num_classes: int, encoder: EncoderConfig) -> None:
        super().__init__()
        dim = encoder.dim
        self.group_divider = tokenizer(encoder)
        self.MAE_encoder = PointEncoder.from_config(encoder)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(2 * dim, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )
        self.cls_head_finetune.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, P, 3) → class logits (B, num_classes)."""
        patches, centres, _ = self.group_divider(points)
        x = self.MAE_encoder.norm(run_blocks(self.MAE_encoder, patches, centres, (self.cls_token, self.cls_pos))[-1])
        return self.cls_head_finetune(torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1))


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


def nearest_centres(xyz: torch.Tensor, centres: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances and indices (B, N, k) of each point's ``k`` nearest centres, nearest first."""
    dist, idx = (torch.cdist(xyz, centres) ** 2).topk(k, dim=-1, largest=False, sorted=True)
    return dist, idx


def interpolate_features(xyz: torch.Tensor, centres: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """PointNet++'s 3-NN interpolation: (B, S, F) centre features → (B, N, F), weights 1/d² normalised."""
    dist, idx = nearest_centres(xyz, centres)
    weight = 1.0 / (dist + 1e-8)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    return (gather_points(features, idx) * weight.unsqueeze(-1)).sum(dim=2)


def concat_features(xyz: torch.Tensor, centres: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The paper's appendix A.2: the features of each point's 3 nearest centres side by side, nearest first,
    (B, S, F) → (B, N, 3·F)."""
    _, idx = nearest_centres(xyz, centres)
    return gather_points(features, idx).flatten(2)


# How a point gathers its nearest centres' features, and how many feature widths that gives it.
GATHER = {"interp": (interpolate_features, 1), "concat": (concat_features, 3)}


class FeaturePropagation(nn.Module):
    """Centre features to every point (``gather``: ``interp``, PointNet++'s feature propagation, or ``concat``),
    concatenated with skip features, then a point MLP. ``in_channels``: the MLP's input (skip + gathered)."""

    def __init__(self, in_channels: int, widths: list[int], gather: str = "interp") -> None:
        super().__init__()
        self.gather = GATHER[gather][0]
        layers: list[nn.Module] = []
        for width in widths:
            layers += conv_bn_relu(in_channels, width)
            in_channels = width
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, xyz: torch.Tensor, centres: torch.Tensor, skip: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """xyz (B, N, 3), centres (B, S, 3), skip (B, D, N), features (B, S, F) → (B, widths[-1], N)."""
        gathered = self.gather(xyz, centres, features)
        return self.mlp(torch.cat([skip, gathered.transpose(1, 2)], dim=1))


class PartSegmenter(nn.Module):
    """Tokenizer → ``MAE_encoder`` (three blocks) → feature propagation + category embedding → part logits."""

    def __init__(self, num_parts: int, num_categories: int, encoder: EncoderConfig) -> None:
        super().__init__()
        dim = encoder.dim
        self.layers = fetch_layers(encoder.depth)
        self.num_categories = num_categories
        self.group_divider = tokenizer(encoder)
        self.MAE_encoder = PointEncoder.from_config(encoder)
        self.label_conv = nn.Sequential(
            nn.Conv1d(num_categories, 64, 1, bias=False), nn.BatchNorm1d(64), nn.LeakyReLU(0.2)
        )
        self.propagation_0 = FeaturePropagation(3 * dim + 3, [4 * dim, 1024])
        self.seg_head = nn.Sequential(
            *conv_bn_relu(1024 + 6 * dim + 64, 512),
            nn.Dropout(0.5),
            *conv_bn_relu(512, 256),
            nn.Conv1d(256, num_parts, 1),
        )

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3), category (B,) index → part logits (B, N, num_parts)."""
        num_points = points.shape[1]
        patches, centres, _ = self.group_divider(points)
        blocks = run_blocks(self.MAE_encoder, patches, centres)
        tokens = torch.cat([self.MAE_encoder.norm(blocks[i]) for i in self.layers], dim=-1)  # (B, G, 3C)
        one_hot = nn.functional.one_hot(category, self.num_categories).to(points.dtype).unsqueeze(-1)
        global_feature = torch.cat([tokens.max(dim=1).values, tokens.mean(dim=1)], dim=-1).unsqueeze(-1)
        global_feature = torch.cat([global_feature, self.label_conv(one_hot)], dim=1).expand(-1, -1, num_points)
        local = self.propagation_0(points, centres, points.transpose(1, 2), tokens)
        return self.seg_head(torch.cat([local, global_feature], dim=1)).transpose(1, 2)


def init_encoder(encoder: PointEncoder, init: str | Path) -> dict:
    """Initialise ``encoder`` from ``init`` (an export / Point-MAE checkpoint, a pkd run directory, or
    ``scratch``); returns a JSON-able report. A checkpoint must provide every encoder weight."""
    if str(init) == SCRATCH:
        return {"init": SCRATCH, "used": 0, "missing": [], "unexpected": 0}
    path = Path(init)
    if path.is_dir():
        path = path / LAST
    report: LoadReport = load_pointmae_checkpoint(path, encoder)
    if report.missing:
        total = len(report.used) + len(report.missing)
        raise WeightsError(
            f"{path} provides only {len(report.used)} of the encoder's {total} "
            f"weights (missing e.g. {report.missing[:3]}); it is an encoder of another depth. "
            "Match --depth/--dim/--heads to the checkpoint."
        )
    provenance = checkpoint_provenance(path) or {}
    teacher = provenance.get("teacher")
    random_teacher = bool(teacher.get("random")) if isinstance(teacher, dict) else None
    if random_teacher:
        log.warning(
            "!!! %s was distilled from a RANDOM TEACHER store (%s): its numbers say nothing about pkd's "
            "pre-training; distill from a store made with the real ClipCap weights.",
            path,
            provenance.get("store"),
        )
    return {
        "init": str(path),
        "used": len(report.used),
        "missing": report.missing,
        "unexpected": len(report.unexpected),
        "unexpected_examples": report.unexpected[:5],
        "store": provenance.get("store"),
        "teacher": teacher,
        "random_teacher": random_teacher,
    }
