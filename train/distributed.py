"""torchrun / DistributedDataParallel plumbing, shared by every training entry point.

``torchrun --nproc-per-node N -m pkd.train …`` sets RANK, WORLD_SIZE and LOCAL_RANK; ``session`` turns
them into one process group (gloo on CPU, nccl on CUDA with ``LOCAL_RANK`` picking the GPU) and tears it
down again. A plain ``python -m pkd.train`` (or torchrun with one process) never touches torch.distributed:
every helper here is then a no-op or the identity.

Batch norm: ``torch.nn.SyncBatchNorm`` only runs on accelerators (its forward raises for CPU input, torch
2.13), so on CPU ``convert_sync_batchnorm`` swaps in ``CpuSyncBatchNorm``: the same parameters and buffers
(identical state dict), with batch statistics summed over all ranks by a differentiable all_reduce, so
DDP on CPU computes what one process computes on the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pkd.common.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (if any); ``device`` picks the backend (cuda → nccl, else gloo).

    Idempotent: an existing process group is reused. Without torchrun (or with one process) nothing is
    initialised and DistInfo() is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU (torch sees {torch.cuda.device_count()}); "
                "start at most one process per GPU (torchrun --nproc-per-node)."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info()


def info() -> DistInfo:
    """This process's DistInfo (DistInfo() when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """True on rank 0 and in a single process: the one process that writes files."""
    return info().main


def barrier() -> None:
    if info().distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: str = "cpu") -> Iterator[DistInfo]:
    """``init_from_env`` on entry; on exit tears the group down again if this call created it."""
    created = launched() and not (dist.is_available() and dist.is_initialized())
    try:
        yield init_from_env(device)
    finally:
        if created:
            cleanup()


def check_global_batch(batch_size: int, rank_info: DistInfo) -> None:
    """``--batch-size`` is the global batch: every rank must get the same share of it."""
    if batch_size % rank_info.world_size:
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the "
            f"{rank_info.world_size} processes; pass a multiple of {rank_info.world_size} or change "
            "--nproc-per-node."
        )


def local_device(device: str, rank_info: DistInfo) -> torch.device:
    """The torch device of this process: ``cuda`` means the GPU LOCAL_RANK names."""
    if device.startswith("cuda") and rank_info.distributed:
        return torch.device("cuda", rank_info.local_rank)
    return torch.device(device)


# ---- collectives (identity in a single process) ---------------------------------------------------------


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ranks (a new tensor; the input itself in a single process)."""
    if not info().distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank."""
    if not info().distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- models ---------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (what every rank's loss owes this input)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks, for CPU/gloo where ``torch.nn.SyncBatchNorm`` refuses to run.

    Same parameters and buffers as BatchNorm*d; normalises dim 1 of (N, C, …) input. Statistics are
    two-pass (mean, then centred squares), summed by an all_reduce whose backward sums the gradients of
    all ranks, as SyncBatchNorm's does.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and info().distributed):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        sums = all_reduce(torch.cat([input.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        var = all_reduce((input - mean.reshape(shape)).pow(2).sum(dims)) / total
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is not None and running_mean is not None and running_var is not None:  # track_running_stats
            with torch.no_grad():
                tracked.add_(1)
                momentum = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1).clamp_min(1))
                running_mean.lerp_(mean.detach(), momentum)
                running_var.lerp_(unbiased.detach(), momentum)
        out = (input - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d of ``module`` synchronised across ranks: SyncBatchNorm on accelerators, else
    CpuSyncBatchNorm (sharing the original parameters and buffers)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def wrap_model(
    model: nn.Module, rank_info: DistInfo, device: torch.device, find_unused_parameters: bool = True
) -> nn.Module:
    """``model`` itself in a single process; under torchrun, synchronised batch norm inside DDP (a plain wrapper:
    callers keep the module's settings, such as its variant, themselves; see ``LossSettings``).

    ``find_unused_parameters`` (default on) lets a forward leave parameters without gradient, as the
    students do (e.g. the concept head never reads the encoder's final norm, kept for Point-MAE export).
    """
    if not rank_info.distributed:
        return model
    model = convert_sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    # batch-norm buffers are identical on every rank (synchronised statistics): no per-forward broadcast
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (state dicts without ``module.``), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
