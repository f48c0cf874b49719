"""The variants' prediction heads: how a student turns its encoder's output into the teacher target.

A head declares the modules it trains, under the state-dict names checkpoints hold (``concept.*``, ``head.*``),
and how it predicts from the encoder's last tokens and all its layers. ``Student`` registers those modules and
calls ``predict``; it never asks which head it holds.

Concept head (paper §3.4, appendix A.1: the concepts are "sent into an MLP"): ``--head flat`` (default) flattens the
32 concept tokens in query order (32·C) and a 2-layer MLP (32·C → head_hidden → the target's size, 10·768 for the
prefix) maps them to the whole target array, so every concept keeps its identity (its own input weights) and the
queries can specialise. ``--head pooled`` mean- and max-pools the concepts first (2·C), which makes the queries
interchangeable; it is kept to measure that difference. The pooled head (``no-concept``) always pools the point
tokens (their order is an FPS artefact, so flattening them would mean nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from pkd.train.concept import ConceptModule
from pkd.train.encoder import Mlp, init_weights

if TYPE_CHECKING:
    from pkd.train.model import Student, StudentConfig

CONCEPT_READOUTS = ("flat", "pooled")


class Head(Protocol):
    """What a variant's student predicts with."""

    def out_shape(self, array_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one prediction for a store array of sample shape ``array_shape``."""
        ...

    def build(self, cfg: StudentConfig, out_dim: int) -> dict[str, nn.Module]:
        """The head's trainable modules, by the state-dict name the student registers each under."""
        ...

    def predict(self, student: Student, tokens: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
        """The prediction from the encoder's tokens (B, G, C) and its layers, in ``student.target_shape``."""
        ...


def mean_max(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, C) → (B, 2·C): mean and max over the tokens (order-invariant)."""
    return torch.cat([tokens.mean(1), tokens.max(1).values], dim=-1)


def _mlp(width: int, hidden: int, out_dim: int) -> Mlp:
    mlp = Mlp(width, hidden, out_dim)
    mlp.apply(init_weights)
    return mlp


@dataclass(frozen=True)
class ConceptHead:
    """Concept queries read every encoder layer; an MLP maps them (flat or pooled: ``--head``) to the target."""

    def out_shape(self, array_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole array of a sample (a prefix (10, 768), an embedding (D,))."""
        return tuple(array_shape)

    def build(self, cfg: StudentConfig, out_dim: int) -> dict[str, nn.Module]:
        concept = ConceptModule(cfg.dim, cfg.num_concepts, cfg.heads, cfg.concept_mlp_ratio)
        width = cfg.num_concepts * cfg.dim if cfg.head == "flat" else 2 * cfg.dim
        return {"concept": concept, "head": _mlp(width, cfg.head_hidden, out_dim)}

    def predict(self, student: Student, tokens: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
        concepts = student.get_submodule("concept")(layers)
        features = concepts.flatten(1) if student.cfg.head == "flat" else mean_max(concepts)
        return student.get_submodule("head")(features).reshape(tokens.shape[0], *student.target_shape)


@dataclass(frozen=True)
class PooledHead:
    """The ``no-concept`` ablation: an MLP on the mean- and max-pooled point tokens."""

    def out_shape(self, array_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole array of a sample."""
        return tuple(array_shape)

    def build(self, cfg: StudentConfig, out_dim: int) -> dict[str, nn.Module]:
        return {"head": _mlp(2 * cfg.dim, cfg.head_hidden, out_dim)}

    def predict(self, student: Student, tokens: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
        return student.get_submodule("head")(mean_max(tokens)).reshape(tokens.shape[0], *student.target_shape)


@dataclass(frozen=True)
class TokenHead:
    """Direct local alignment: an MLP on every point token, one prediction per patch (B, G, D)."""

    def out_shape(self, array_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One row (D,) of the teacher's (T, D) patch tokens."""
        return tuple(array_shape[1:])

    def build(self, cfg: StudentConfig, out_dim: int) -> dict[str, nn.Module]:
        return {"head": _mlp(cfg.dim, cfg.head_hidden, out_dim)}

    def predict(self, student: Student, tokens: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
        return student.get_submodule("head")(tokens)
