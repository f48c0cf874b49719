"""The student: tokenizer, Point-MAE encoder, and its variant's head (``pkd.train.heads``) and/or decoder.

State-dict prefixes: ``MAE_encoder.*`` (exported, Point-MAE names), ``concept.*`` and ``head.*`` (the variant's
head), ``MAE_decoder.*`` (masked reconstruction; never exported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.train.encoder import (
    EncoderConfig,
    PointEncoder,
    TransformerEncoder,
    init_weights,
    positional_embedding,
    tokenizer,
)
from pkd.train.heads import CONCEPT_READOUTS
from pkd.train.variants import ObjectiveConfig


@dataclass(frozen=True, kw_only=True)
class StudentConfig(EncoderConfig, ObjectiveConfig):
    """A student: its encoder (``EncoderConfig``'s fields), heads and decoder, and what it is trained to do
    (``ObjectiveConfig``'s fields); defaults are the paper's."""

    num_points: int = option(4096, "points per cloud fed to the student (subsampled)")
    num_concepts: int = option(32, "concept queries")
    concept_mlp_ratio: float = option(1.0, "MLP width of the shared concept block, relative to dim")
    head: str = option("flat", "flat: the MLP reads all concept tokens (paper); pooled: mean+max pooled concepts")
    head_hidden: int = option(1024, "hidden width of the 2-layer prediction MLP")
    decoder_depth: int = option(3, "transformer blocks of the reconstruction decoder (paper: 3)")

    def __post_init__(self) -> None:
        EncoderConfig.__post_init__(self)
        ObjectiveConfig.__post_init__(self)
        if self.head not in CONCEPT_READOUTS:
            raise ConfigError(f"unknown head {self.head!r}; choose one of {', '.join(CONCEPT_READOUTS)}.")
        small = [
            f"{k} {getattr(self, k)}"
            for k in ("num_points", "num_concepts", "head_hidden", "decoder_depth")
            if getattr(self, k) < 1
        ]
        if small:
            raise ConfigError(f"{', '.join(small)}: must be at least 1.")
        if self.num_group > self.num_points or self.group_size > self.num_points:
            raise ConfigError(
                f"num_points {self.num_points} is too small for {self.num_group} groups of {self.group_size} points."
            )
        if not 0 < int(self.mask_ratio * self.num_group) < self.num_group:
            raise ConfigError(
                f"mask_ratio {self.mask_ratio} must mask some but not all of the {self.num_group} patches."
            )


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
        self.spec = cfg.spec
        self.group_divider = tokenizer(cfg)
        self.MAE_encoder = PointEncoder.from_config(cfg)
        self.target_shape: tuple[int, ...] = ()  # one prediction of the head (``Head.out_shape``)
        if self.spec.head is not None:
            if cfg.target_shape is None:
                raise ConfigError(
                    f"variant {cfg.variant} predicts {cfg.target_name} but its config has no target_shape (the "
                    "sample shape of that store array, which the trainer reads from the store); set it."
                )
            self.target_shape = self.spec.head.out_shape(tuple(cfg.target_shape))
            for name, module in self.spec.head.build(cfg, math.prod(self.target_shape)).items():
                self.add_module(name, module)
        if self.spec.recon:
            self.MAE_decoder = MaskedDecoder(cfg.dim, cfg.decoder_depth, cfg.heads, cfg.group_size, cfg.drop_path)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> StudentOutput:
        """points (B, P, 3); ``mask`` (B, G) selects patches to reconstruct (recon variants only)."""
        patches, centres, centre_idx = self.group_divider(points)
        out = StudentOutput(centre_idx=centre_idx)
        if self.spec.head is not None:
            tokens, layers = self.MAE_encoder(patches, centres)
            out.pred = self.spec.head.predict(self, tokens, layers)
        if self.spec.recon:
            if mask is None:
                raise ValueError("a reconstruction variant needs a patch mask")
            out.recon_pred, out.recon_target = self.reconstruct(self.MAE_decoder, patches, centres, mask)
        return out

    def reconstruct(
        self, decoder: MaskedDecoder, patches: torch.Tensor, centres: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decoder``'s prediction of the masked patches from the visible ones, and those patches (B, M, k, 3)."""
        visible, _ = self.MAE_encoder(patches, centres, mask)
        pred = decoder(visible, centres, mask)
        return pred, patches[mask].reshape(pred.shape)


def random_mask(
    batch: int, num_group: int, ratio: float, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """(B, G) bool with exactly int(ratio·G) True per row, at random positions (Point-MAE's 'rand' mask).

    A sequence of generators draws the rows in equal consecutive slices, one generator each (the data
    streams of a batch, see pkd.train.data), so a slice's masks do not depend on how the batch is split.
    """
    if isinstance(generator, Sequence):
        per = batch // len(generator)
        return torch.cat([random_mask(per, num_group, ratio, g) for g in generator])
    ranks = torch.rand(batch, num_group, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < int(ratio * num_group)
