"""Point-MAE's encoder (mini-PointNet patch embedding + transformer), with Point-MAE's parameter names.

``PointEncoder`` holds exactly the parameters of Point-MAE's ``MaskTransformer`` (``encoder.*``,
``pos_embed.*``, ``blocks.blocks.{i}.*``, ``norm.*``), so a student's ``MAE_encoder.*`` state dict is a
Point-MAE pre-training checkpoint. Attention uses ``scaled_dot_product_attention``.

``EncoderConfig`` is the one declaration of the encoder's and its tokenizer's sizes; the student, the
fine-tuning models and the linear probe all build their encoder from it (``PointEncoder.from_config``,
``tokenizer``), and their configs extend it, so run configs keep the sizes as flat fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.train.tokenizer import Group


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Point-MAE's ViT-S encoder and its patch tokenizer; defaults are Point-MAE's (and the paper's)."""

    num_group: int = option(64, "patches (FPS centres) per cloud")
    group_size: int = option(32, "points per patch (kNN)")
    dim: int = option(384, "encoder width")
    depth: int = option(12, "encoder blocks")
    heads: int = option(6, "attention heads")
    drop_path: float = option(0.1, "stochastic depth (its masks differ between world sizes)")

    def __post_init__(self) -> None:
        small = [
            f"{k} {getattr(self, k)}"
            for k in ("num_group", "group_size", "dim", "depth", "heads")
            if getattr(self, k) < 1
        ]
        if small:
            raise ConfigError(f"{', '.join(small)}: must be at least 1.")
        if self.dim % self.heads:
            raise ConfigError(
                f"dim {self.dim} is not divisible by heads {self.heads}; choose --dim a multiple of --heads."
            )
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path {self.drop_path} must lie in [0, 1).")


def tokenizer(cfg: EncoderConfig) -> Group:
    """The FPS + kNN patch tokenizer of ``cfg``."""
    return Group(cfg.num_group, cfg.group_size)


class Encoder(nn.Module):
    """Mini-PointNet: patches (B, G, k, 3) → one token per patch (B, G, C).

    The parameters are Point-MAE's (``first_conv``/``second_conv`` = Conv1d(k=1), BatchNorm1d, ReLU,
    Conv1d(k=1)); the forward applies the 1×1 convolutions as matrix products on channels-last points,
    which computes the same function without Conv1d's layout conversions (~25 % less CPU time).
    """

    def __init__(self, encoder_channel: int) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_channel, 1)
        )

    @staticmethod
    def _pointwise(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """Conv1d(1) → BatchNorm → ReLU → Conv1d(1) on x (N, k, C_in) → (N, k, C_out)."""
        conv1, norm, conv2 = cast(nn.Conv1d, layers[0]), layers[1], cast(nn.Conv1d, layers[3])
        n, k, _ = x.shape
        x = F.linear(x, conv1.weight.squeeze(-1), conv1.bias)
        x = F.relu(norm(x.reshape(n * k, -1))).reshape(n, k, -1)
        return F.linear(x, conv2.weight.squeeze(-1), conv2.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, groups, k, _ = patches.shape
        feature = self._pointwise(self.first_conv, patches.reshape(batch * groups, k, 3))
        glob = feature.max(dim=1, keepdim=True).values
        feature = self._pointwise(self.second_conv, torch.cat([glob.expand(-1, k, -1), feature], dim=-1))
        return feature.max(dim=1).values.reshape(batch, groups, self.encoder_channel)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; qkv without bias, as Point-MAE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Blocks with the positional embedding added to every block's input (``x = block(x + pos)``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([Block(dim, num_heads, drop_path=r) for r in rates])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output, in order (the last one is the final, not yet normalised, token set)."""
        outputs = []
        for block in self.blocks:
            x = block(x + pos)
            outputs.append(x)
        return outputs


def positional_embedding(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


def init_weights(module: nn.Module) -> None:
    """Point-MAE's initialisation: truncated normal (std 0.02) for Linear/Conv1d, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PointEncoder(nn.Module):
    """Point-MAE ``MaskTransformer`` encoder: patch tokens + centre embedding → transformer → LayerNorm."""

    def __init__(
        self,
        dim: int = EncoderConfig.dim,
        depth: int = EncoderConfig.depth,
        num_heads: int = EncoderConfig.heads,
        drop_path: float = EncoderConfig.drop_path,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(dim)
        self.pos_embed = positional_embedding(dim)
        self.blocks = TransformerEncoder(dim, depth, num_heads, drop_path)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> PointEncoder:
        """The encoder of ``cfg`` (freshly initialised)."""
        return cls(cfg.dim, cfg.depth, cfg.heads, cfg.drop_path)

    def forward(
        self, patches: torch.Tensor, centres: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised final tokens (B, G', C) and every layer's raw output; ``mask`` (B, G) True hides a patch."""
        tokens = self.encoder(patches)
        if mask is not None:
            batch, _, dim = tokens.shape
            tokens = tokens[~mask].reshape(batch, -1, dim)
            centres = centres[~mask].reshape(batch, -1, 3)
        layers = self.blocks(tokens, self.pos_embed(centres))
        return self.norm(layers[-1]), layers
