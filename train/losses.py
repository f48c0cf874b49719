"""``compute_loss``: the weighted sum of a variant's loss terms for one batch, and the paper's Table 7 probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from pkd.train.loss_terms import CropBox, patch_chamfer
from pkd.train.model import MaskedDecoder, Student, StudentConfig, random_mask
from pkd.train.variants import Variant


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    """What ``compute_loss`` computes: the student's objective (variant, mask, weights) and the teacher crop."""

    objective: StudentConfig
    crop: CropBox | None = None

    @classmethod
    def of(cls, model: StudentConfig, crop: CropBox | None = None) -> LossSettings:
        """The settings of a student config's objective (``crop``: the teacher's, for direct local alignment)."""
        return cls(objective=model, crop=crop)

    @property
    def variant(self) -> Variant:
        return self.objective.spec

    @property
    def local_pairing(self) -> str:
        return self.objective.local_pairing

    def mask(self, batch: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """A reconstruction mask (B, G) drawn from ``generator`` (None: torch's global generator)."""
        return random_mask(
            batch,
            self.objective.num_group,
            self.objective.mask_ratio,
            torch.default_generator if generator is None else generator,
        )


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    mask_generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one batch and its named parts (detached tensors, still on the device: reading them is a
    host sync the training loop makes once every ``--log-every`` steps).

    ``model`` is a Student of ``settings.variant`` or its DDP wrapper; only its forward is called.
    """
    spec = settings.variant
    mask = None
    if spec.recon:
        mask = settings.mask(batch["points"].shape[0], mask_generator).to(batch["points"].device)
    out = model(batch["points"], mask)
    parts = {term.name: term(out, batch, settings) for term in spec.losses}
    weights = {term.name: settings.objective.weight(term) for term in spec.losses}
    total = cast(torch.Tensor, sum(weights[name] * value for name, value in parts.items()))
    return total, {name: value.detach() for name, value in parts.items()}


def monitor_recon_loss(
    model: Student, decoder: MaskedDecoder, points: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Chamfer-L2 of a (frozen, randomly initialised) ``decoder`` reconstructing the masked patches from the
    student encoder's visible tokens: the paper's Table 7 probe of what distillation does to reconstruction."""
    patches, centres, _ = model.group_divider(points)
    return patch_chamfer(*model.reconstruct(decoder, patches, centres, mask))
