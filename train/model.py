"""The student: tokenizer, Point-MAE encoder, and the variant's head (concepts, pooling, per-token, decoder).

State-dict prefixes: ``MAE_encoder.*`` (exported, Point-MAE names), ``concept.*`` and ``head.*`` (distillation),
``MAE_decoder.*`` (masked reconstruction; never exported).

Head choice for the prefix: the 32 concept tokens are mean- and max-pooled (2·C) and a 2-layer MLP
(2·C → head_hidden → 10·768) maps them to the prefix. ``no-concept`` uses the very same head on the
pooled point tokens, so the two ablation arms differ only by the concept module; a flattened 32·C input
would add ~12 M head parameters (and their optimizer cost) for the concept arm alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pkd.common.errors import ConfigError
from pkd.common.store import CLIP_DIM, PREFIX_SHAPE
from pkd.train.concept import ConceptModule
from pkd.train.encoder import Mlp, PointEncoder, TransformerEncoder, init_weights, positional_embedding
from pkd.train.tokenizer import Group


@dataclass(frozen=True)
class Variant:
    """What a training variant reads from the store and how its student predicts."""

    target: str | None      # store array the head regresses, None for pure reconstruction
    head: str | None        # "concept" | "pool" | "token" | None
    recon: bool             # Point-MAE masked reconstruction loss
    extra_arrays: tuple[str, ...] = ()

    @property
    def arrays(self) -> tuple[str, ...]:
        """Store arrays a loader must read for this variant."""
        return ("points",) + ((self.target,) if self.target else ()) + self.extra_arrays


VARIANTS: dict[str, Variant] = {
    "distill": Variant("prefix", "concept", False),
    "no-concept": Variant("prefix", "pool", False),
    "clip-target": Variant("clip_embed", "concept", False),
    "local": Variant("patch_tokens", "token", False, ("pixels", "in_view")),
    "recon": Variant(None, None, True),
    "recon+distill": Variant("prefix", "concept", True),
}

TARGET_SHAPES = {"prefix": PREFIX_SHAPE, "clip_embed": (CLIP_DIM,), "patch_tokens": (CLIP_DIM,)}


def variant_spec(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[name]


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of a student; defaults are the paper's (Point-MAE's ViT-S-like encoder)."""

    num_points: int = 4096
    num_group: int = 64
    group_size: int = 32
    dim: int = 384
    depth: int = 12
    heads: int = 6
    drop_path: float = 0.1
    num_concepts: int = 32
    concept_mlp_ratio: float = 1.0
    head_hidden: int = 1024
    decoder_depth: int = 4
    mask_ratio: float = 0.6
    variant: str = "distill"

    def __post_init__(self) -> None:
        variant_spec(self.variant)
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}.")
        if self.num_group > self.num_points or self.group_size > self.num_points:
            raise ConfigError(f"num_points {self.num_points} is too small for {self.num_group} groups of "
                              f"{self.group_size} points.")


class MaskedDecoder(nn.Module):
    """Point-MAE's reconstruction decoder: mask tokens + centre embeddings → patch coordinates (B, M, k, 3)."""

    def __init__(self, dim: int, depth: int, num_heads: int, group_size: int, drop_path: float) -> None:
        super().__init__()
        self.group_size = group_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = positional_embedding(dim)
        self.blocks = TransformerEncoder(dim, depth, num_heads, drop_path)
        self.norm = nn.LayerNorm(dim)
        self.increase_dim = nn.Conv1d(dim, 3 * group_size, 1)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, centres: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, _, dim = visible.shape
        pos_vis = self.pos_embed(centres[~mask].reshape(batch, -1, 3))
        pos_mask = self.pos_embed(centres[mask].reshape(batch, -1, 3))
        num_masked = pos_mask.shape[1]
        x = torch.cat([visible, self.mask_token.expand(batch, num_masked, -1)], dim=1)
        x = self.blocks(x, torch.cat([pos_vis, pos_mask], dim=1))[-1]
        x = self.norm(x[:, -num_masked:])
        return self.increase_dim(x.transpose(1, 2)).transpose(1, 2).reshape(batch, num_masked, self.group_size, 3)


@dataclass
class StudentOutput:
    """What one forward pass produced; fields a variant does not use are None."""

    centre_idx: torch.Tensor
    pred: torch.Tensor | None = None
    recon_pred: torch.Tensor | None = None
    recon_target: torch.Tensor | None = None


class Student(nn.Module):
    """Tokenizer → ``MAE_encoder`` → the variant's head and/or ``MAE_decoder``."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = variant_spec(cfg.variant)
        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.MAE_encoder = PointEncoder(cfg.dim, cfg.depth, cfg.heads, cfg.drop_path)
        out_dim = 0 if self.spec.target is None else int(torch.Size(TARGET_SHAPES[self.spec.target]).numel())
        if self.spec.head == "concept":
            self.concept = ConceptModule(cfg.dim, cfg.num_concepts, cfg.heads, cfg.concept_mlp_ratio)
        if self.spec.head is not None:
            in_dim = cfg.dim if self.spec.head == "token" else 2 * cfg.dim
            self.head = Mlp(in_dim, cfg.head_hidden, out_dim)
            self.head.apply(init_weights)
        if self.spec.recon:
            self.MAE_decoder = MaskedDecoder(cfg.dim, cfg.decoder_depth, cfg.heads, cfg.group_size, cfg.drop_path)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> StudentOutput:
        """points (B, P, 3); ``mask`` (B, G) selects patches to reconstruct (recon variants only)."""
        patches, centres, centre_idx = self.group_divider(points)
        out = StudentOutput(centre_idx=centre_idx)
        if self.spec.head is not None:
            tokens, layers = self.MAE_encoder(patches, centres)
            out.pred = self._predict(tokens, layers)
        if self.spec.recon:
            if mask is None:
                raise ValueError("a reconstruction variant needs a patch mask")
            visible, _ = self.MAE_encoder(patches, centres, mask)
            out.recon_pred = self.MAE_decoder(visible, centres, mask)
            out.recon_target = patches[mask].reshape(out.recon_pred.shape)
        return out

    def _predict(self, tokens: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
        if self.spec.head == "token":
            return self.head(tokens)
        pooled = self.concept(layers) if self.spec.head == "concept" else tokens
        features = torch.cat([pooled.mean(1), pooled.max(1).values], dim=-1)
        return self.head(features).reshape(tokens.shape[0], *TARGET_SHAPES[self.spec.target])


def build_student(cfg: StudentConfig) -> Student:
    """A freshly initialised student for ``cfg``."""
    return Student(cfg)


def random_mask(batch: int, num_group: int, ratio: float,
                generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """(B, G) bool with exactly int(ratio·G) True per row, at random positions (Point-MAE's 'rand' mask).

    A sequence of generators draws the rows in equal consecutive slices, one generator each (the data
    streams of a batch, see pkd.train.data), so a slice's masks do not depend on how the batch is split.
    """
    if isinstance(generator, Sequence):
        per = batch // len(generator)
        return torch.cat([random_mask(per, num_group, ratio, g) for g in generator])
    ranks = torch.rand(batch, num_group, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < int(ratio * num_group)
