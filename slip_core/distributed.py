"""Small torch.distributed helpers shared by the losses, the SimCLR head and the trainer.

Everything works without an initialised process group (world size 1, rank 0), so the same code runs in
unit tests, in a single-process demo and under torchrun.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slip_core.config import ConfigError


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def world_info() -> WorldInfo:
    """Rank / world size from the process group if initialised, else from torchrun's env vars, else 0/1."""
    if is_dist():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return WorldInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def local_device(preference: str = "auto") -> torch.device:
    """The device this process computes on: "auto" = this rank's CUDA device (LOCAL_RANK) when CUDA is
    present, else the CPU; "cpu"; "cuda" / "cuda:N". Asking for CUDA without one is an error."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(DEVICE_PATTERN, preference):
        raise ConfigError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {preference!r} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_from_env(device: torch.device) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL for a CUDA device, gloo otherwise); True when
    this call created it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or is_dist():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 as a constant (reference CLIP loss, SPEC §4).

    Like the reference's all_gather_batch, a single process gets `x` itself back (WITH its graph), so one
    rank computes the full-gradient loss and only multi-rank runs drop the gradient (SPEC §9.3).
    """
    if get_world_size() == 1:
        return x
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the incoming gradients and returns this rank's slice.

    That is the reference's GatherLayer (SPEC §4): every rank's loss contributes gradient to every rank's
    inputs, so after DDP's gradient averaging the result equals the gradient of the mean global loss.
    Works on gloo (CPU) and NCCL alike (only all_gather and all_reduce are needed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, differentiable (equal local batch sizes required)."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class SyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the whole global batch (the reference's SyncBatchNorm).

    Why not torch's nn.SyncBatchNorm: it refuses CPU tensors once a process group exists, and DDP refuses
    to wrap a CPU model containing it, so 2-rank gloo runs (tests, the CPU demo with nproc > 1) could not
    use the reference head. Here the local batch is gathered WITH gradient, normalised with plain
    batch_norm over the global batch (same mean/var and the same unbiased running_var update as
    SyncBatchNorm), and the local slice is kept; the gather's backward sums every rank's contribution
    exactly like SyncBatchNorm's backward all-reduce. Any device, any backend; local batch sizes must be
    equal across ranks (drop_last, as the reference). Costs an all_gather of [B, C] activations rather than
    of per-channel statistics, negligible next to the ViT. Without a process group, with one rank, or in
    eval() it is plain BatchNorm1d. State dict = SyncBatchNorm's (weight, bias, running_mean, running_var,
    num_batches_tracked), so released checkpoints load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        full = all_gather_with_grad(x)
        out = F.batch_norm(full, self.running_mean, self.running_var, self.weight, self.bias,
                           True, momentum, self.eps)
        b, r = x.shape[0], get_rank()
        return out[r * b:(r + 1) * b]
