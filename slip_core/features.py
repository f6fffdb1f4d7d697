"""Frozen-feature extraction over a dataset and a content-keyed on-disk cache of numpy arrays."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from slip_core import storage


@torch.no_grad()
def extract(fn, dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run `fn(images) -> [N, D]` over a (map-style or iterable) dataset: (float32 [N, D], int64 [N])."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(fn(images).float().cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        raise ValueError("dataset is empty")
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_arrays(path: Path, compute):
    """np.savez cache: load `path` if present, else compute a dict of arrays and write it atomically."""
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.atomic_write_bytes(str(path), buf.getvalue())
    return arrays
