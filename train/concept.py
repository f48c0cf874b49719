"""Concept queries: learnable tokens that read every encoder layer through one shared cross-attention block.

After encoder layer i the same block (LayerNorms, cross-attention from the queries to that layer's
tokens, MLP, both residual) updates the queries, so the module adds parameters once, not per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pkd.train.encoder import Mlp, init_weights


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, m, dim = queries.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(queries).reshape(batch, m, heads, head_dim).transpose(1, 2)
        k, v = self.kv(tokens).reshape(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, m, dim))


class ConceptBlock(nn.Module):
    """queries ← queries + CrossAttn(LN(queries), LN(tokens)); queries ← queries + MLP(LN(queries))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(self.norm_q(queries), self.norm_kv(tokens))
        return queries + self.mlp(self.norm2(queries))


class ConceptModule(nn.Module):
    """32 (by default) concept queries updated once per encoder layer → (B, num_concepts, C)."""

    def __init__(self, dim: int, num_concepts: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_concepts, dim))
        self.block = ConceptBlock(dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        queries = self.queries.expand(layers[0].shape[0], -1, -1)
        for tokens in layers:
            queries = self.block(queries, tokens)
        return self.norm(queries)
