"""``--monitor-recon``: the paper's Table 7 probe of what pre-training does to reconstruction.

The Chamfer-L2 of a frozen, randomly initialised decoder (``--decoder-depth`` blocks, initialised from the
run's ``--seed`` alone) reconstructing masked patches from the student encoder's visible tokens
(``pkd.train.losses.monitor_recon_loss``). The trainer measures it on every training micro-batch before the
step's update (as the training loss is: step records carry ``monitor_recon``; epoch records its mean), once
more as the step-0 ``monitor`` record (the paper's "No training" row), and ``pkd.train.heldout`` on the
held-out split. Measuring changes nothing the run computes: eval mode (no drop-path, BatchNorm running
statistics, none updated), no gradients, masks from the probe's own generators, the global RNG untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pkd.train.config import TrainConfig
from pkd.train.losses import LossSettings, monitor_recon_loss
from pkd.train.model import MaskedDecoder, Student

MONITOR_KEY = 0x6D6F6E  # "mon": keeps the probe's mask draws apart from every training draw


class ReconMonitor:
    """The frozen random decoder of a run; ``loss`` measures a batch with it."""

    def __init__(self, cfg: TrainConfig, settings: LossSettings) -> None:
        self.seed, self.settings = cfg.seed, settings
        self.decoder = frozen_decoder(cfg)

    def generators(self, micro: int, streams: Sequence[int]) -> list[torch.Generator]:
        """The mask generators of training micro-batch ``micro``, one per data stream it holds, so the masks
        (and the logged mean over ranks) do not depend on the world size."""
        return [
            torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, micro, s, MONITOR_KEY]).generate_state(1)[0])
            )
            for s in streams
        ]

    @torch.no_grad()
    def loss(self, model: Student, points: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> float:
        """Chamfer-L2 of the frozen decoder on ``points`` (B, N, 3), masks drawn from ``generator``; ``model``
        is in eval mode meanwhile and returns to its mode after."""
        mask = self.settings.mask(len(points), generator).to(points.device)
        was_training = model.training
        model.eval()
        try:
            return float(monitor_recon_loss(model, self.decoder.to(points.device), points, mask))
        finally:
            model.train(was_training)


def frozen_decoder(cfg: TrainConfig) -> MaskedDecoder:
    """A reconstruction decoder initialised from ``cfg.seed`` alone (the global RNG is left as it was), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        m = cfg.model
        decoder = MaskedDecoder(m.dim, m.decoder_depth, m.heads, m.group_size, drop_path=0.0).eval()
    return decoder.requires_grad_(False)
