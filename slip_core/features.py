"""Frozen-feature extraction over a dataset, on a device and across ranks, and a content-keyed on-disk cache
of numpy arrays.

`extract` runs `fn(images) -> [B, D]` batch by batch: on CUDA the batches come from a pinned, parallel
DataLoader and run under bf16 autocast; on CPU in fp32 (the tested default). Under torchrun (a process group
initialised) each rank takes one contiguous slice of the dataset (a map-style dataset by index, a
`shard(rank, world)`-able iterable one by its shards) and rank 0 receives the concatenation in rank order --
for a map-style dataset exactly the single-process order. Other ranks get None.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from slip_core import storage
from slip_core.distributed import get_rank, get_world_size


def precision(device: torch.device | str) -> str:
    """The compute precision extraction uses on `device` (part of every feature cache key)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_slice(dataset, rank: int, world: int):
    """This rank's contiguous part of `dataset` (the split `extract` uses under torchrun)."""
    if world == 1:
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if not hasattr(dataset, "shard"):
            raise TypeError(f"{type(dataset).__name__} cannot be split across ranks (it has no shard(rank, world))")
        return dataset.shard(rank, world)
    n = len(dataset)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return torch.utils.data.Subset(dataset, list(range(lo, hi)))


def loader(dataset, batch_size: int, num_workers: int, device: torch.device | str) -> torch.utils.data.DataLoader:
    """In-order DataLoader for inference: pinned memory when feeding a GPU, `num_workers` processes."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=torch.device(device).type == "cuda")


def _gather_to_main(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Concatenate every rank's (x [n_r, D], y [n_r]) on rank 0 in rank order (ranks may hold 0 rows)."""
    world, rank = get_world_size(), get_rank()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    meta = torch.tensor([x.shape[0], x.shape[1] if x.ndim == 2 else -1], dtype=torch.int64, device=comm)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    sizes = [int(m[0]) for m in metas]
    dim = max(int(m[1]) for m in metas)
    if dim < 0:
        raise ValueError("dataset is empty")
    rows = max(sizes)
    xp = torch.zeros(rows, dim, dtype=torch.float32, device=comm)
    yp = torch.zeros(rows, dtype=torch.int64, device=comm)
    if x.shape[0]:
        xp[:x.shape[0]], yp[:y.shape[0]] = x.to(comm), y.to(comm)
    xs = [torch.empty_like(xp) for _ in range(world)] if rank == 0 else None
    ys = [torch.empty_like(yp) for _ in range(world)] if rank == 0 else None
    dist.gather(xp, xs, dst=0)
    dist.gather(yp, ys, dst=0)
    if rank != 0:
        return None
    return (torch.cat([t[:n].cpu() for t, n in zip(xs, sizes)]), torch.cat([t[:n].cpu() for t, n in zip(ys, sizes)]))


@torch.no_grad()
def extract(fn, dataset, batch_size: int = 256, num_workers: int = 0,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Run `fn(images) -> [B, D]` over a (map-style or shardable iterable) dataset of (image, label):
    (float32 [N, D], int64 [N]). The model behind `fn` must already be on `device`. Under torchrun every rank
    extracts its slice and rank 0 gets the whole; the other ranks get (None, None)."""
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    feats, labels = [], []
    for images, y in loader(rank_slice(dataset, rank, world), batch_size, num_workers, device):
        with autocast(device):
            out = fn(images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
    x = torch.cat(feats) if feats else torch.zeros(0)
    y = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.int64)
    if world > 1:
        whole = _gather_to_main(x, y)
        if whole is None:
            return None, None
        x, y = whole
    if not len(y):
        raise ValueError("dataset is empty")
    return x.numpy(), y.numpy()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_arrays(path: Path, compute, collective: bool = False):
    """np.savez cache: load `path` if present, else compute a dict of arrays and write it atomically.

    collective=True: `compute` is a collective over all ranks (e.g. `extract` under torchrun). Rank 0 decides
    whether the cache exists and every rank follows, so all ranks enter the compute or none does; rank 0
    loads / writes and returns the arrays, the other ranks return None."""
    if collective and get_world_size() > 1:
        found = [path.exists() if get_rank() == 0 else None]
        dist.broadcast_object_list(found, src=0)
        if get_rank() != 0:
            if not found[0]:
                compute()
            return None
        if not found[0]:
            return _write(path, compute())
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return _write(path, compute())


def _write(path: Path, arrays: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.atomic_write_bytes(str(path), buf.getvalue())
    return arrays
