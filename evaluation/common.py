"""Shared evaluation plumbing: resolving and loading a checkpoint, the eval transforms, and frozen features
of a catalog split cached by content (checkpoint sha256 + dataset + settings). The generic pieces live in
slip_core: image reading in `slip_core.eval_images`, extraction and the array cache in `slip_core.features`.

Transforms reuse `slip_core.augment.val_transform` (the pretraining val transform, SPEC §5) so zero-shot
sees exactly what pretraining validation sees; the linear-probe eval transform resizes to size·256/224 first
(MoCo v3 / SPEC §7).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slip_core import artifacts, checkpoint, storage
from slip_core.eval_images import PILToTensor
from slip_core.features import cache_key, cached_arrays, extract, precision


def cache_root(cache_dir: str | None = None) -> Path:
    from datasets.offline import data_dir

    return Path(cache_dir or os.environ.get("SLIP_EVAL_CACHE") or data_dir() / "eval-cache")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    sha256: str  # of the checkpoint file
    path: str  # the checkpoint file
    name: str  # model preset name
    manifest_url: str | None = None

    def on(self, device: torch.device | str) -> torch.nn.Module:
        """The model, moved to `device` (kept there for the next task)."""
        self.model = self.model.to(device)
        return self.model


WHICH = ("final", "best")  # a checkpoint artifact's checkpoint.pt, or its checkpoint_best.pt (in-training eval)
CHECKPOINT_FILES = {"final": "checkpoint.pt", "best": "checkpoint_best.pt"}


def resolve_checkpoint(checkpoint_or_manifest: str, which: str = "final", log=None) -> tuple[str, str | None]:
    """(checkpoint file URL, manifest URL or None) for a .pt path, an artifact folder or its manifest.json.
    `which` picks an artifact's final or best checkpoint (a .pt path is taken as given); an artifact without a
    best checkpoint (no in-training evaluation ran) gives its final one, and `log` (or stderr) says so."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    s = str(checkpoint_or_manifest)
    if s.endswith(".json") or (storage.exists(artifacts.manifest_url(s)) and not s.endswith(".pt")):
        m = artifacts.load_verified(s)  # a tampered or partial checkpoint artifact is never evaluated
        paths = [f.path for f in m.files]
        want = CHECKPOINT_FILES[which]
        if which == "best" and not any(p.endswith(want) for p in paths):
            (log or (lambda msg: print(msg, file=sys.stderr)))(
                f"{s} has no {want} (no in-training evaluation ran): evaluating its final checkpoint")
            want = CHECKPOINT_FILES["final"]
        pts = [p for p in paths if p.endswith(want)] or [p for p in paths if p.endswith(".pt")]
        if not pts:
            raise FileNotFoundError(f"checkpoint artifact {s} lists no .pt file")
        root = artifacts.artifact_root(artifacts.manifest_url(s))
        return storage.join(root, pts[0]), artifacts.manifest_url(s)
    if not storage.exists(s):
        raise FileNotFoundError(f"checkpoint not found: {s}")
    return s, None


def load_model(checkpoint_or_manifest: str, which: str = "final") -> LoadedModel:
    path, murl = resolve_checkpoint(checkpoint_or_manifest, which)
    model = checkpoint.load_checkpoint(path)
    return LoadedModel(model, storage.sha256_file(path), path, model.config.name, murl)


def zeroshot_transform(size: int) -> PILToTensor:
    return PILToTensor(size)


def probe_eval_transform(size: int) -> PILToTensor:
    return PILToTensor(size, int(round(size * 256 / 224)))


def features(lm: LoadedModel, loaded, kind: str, batch_size: int = 256, num_workers: int = 0,
             cache_dir: str | None = None, dataset_sha256: str = "",
             device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Frozen image features of one dataset split, cached by (checkpoint, dataset, split, kind, transform,
    sample count, precision). kind: "embed" (projected, for zero-shot/retrieval) or "visual" (pooled ViT
    feature, probe). Under torchrun every rank extracts a slice; rank 0 gets the arrays, the others (None, None)."""
    model = lm.on(device)
    fn = model.encode_image if kind == "embed" else model.visual
    key = cache_key(ckpt=lm.sha256, ds=loaded.name, data=dataset_sha256, split=loaded.split,
                    n=loaded.known_size if loaded.known_size is not None else f"stream<={loaded.max_samples}",
                    kind=kind, t=repr(loaded.transform), path=loaded.path, precision=precision(device))
    path = cache_root(cache_dir) / "features" / lm.sha256[:16] / f"{loaded.name}-{loaded.split}-{kind}-{key}.npz"
    out = cached_arrays(path, lambda: dict(zip(("x", "y"), extract(fn, loaded.dataset, batch_size, num_workers, device))),
                        collective=True)
    return (None, None) if out is None else (out["x"], out["y"])
