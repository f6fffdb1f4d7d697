"""Shared evaluation plumbing: resolving and loading a checkpoint, the val transforms, frozen-feature
extraction and an on-disk cache keyed by content (checkpoint sha256 + dataset + settings).

Transforms reuse `slip_core.augment.val_transform` (the pretraining val transform, SPEC §5) so zero-shot
sees exactly what pretraining validation sees; the linear-probe eval transform resizes to size·256/224 first
(MoCo v3 / SPEC §7).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slip_core import artifacts, augment, checkpoint, storage, tarsamples


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


def resolve_checkpoint(checkpoint_or_manifest: str) -> tuple[str, str | None]:
    """(checkpoint file URL, manifest URL or None) for a .pt path, an artifact folder or its manifest.json."""
    s = str(checkpoint_or_manifest)
    if s.endswith(".json") or (storage.exists(artifacts.manifest_url(s)) and not s.endswith(".pt")):
        m = artifacts.load_verified(s)  # a tampered or partial checkpoint artifact is never evaluated
        pts = [f.path for f in m.files if f.path.endswith("checkpoint.pt")] or [f.path for f in m.files if f.path.endswith(".pt")]
        if not pts:
            raise FileNotFoundError(f"checkpoint artifact {s} lists no .pt file")
        root = artifacts.artifact_root(artifacts.manifest_url(s))
        return storage.join(root, pts[0]), artifacts.manifest_url(s)
    if not storage.exists(s):
        raise FileNotFoundError(f"checkpoint not found: {s}")
    return s, None


def load_model(checkpoint_or_manifest: str) -> LoadedModel:
    path, murl = resolve_checkpoint(checkpoint_or_manifest)
    model = checkpoint.load_checkpoint(path)
    return LoadedModel(model, storage.sha256_file(path), path, model.config.name, murl)


class PILToTensor:
    """PIL image -> reference val tensor (resize short side to `resize`, centre-crop `size`, normalise)."""

    def __init__(self, size: int, resize: int | None = None):
        self.size, self.resize = size, resize or size

    def __call__(self, img) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB"))
        t = augment.val_transform(arr, self.resize)
        if self.resize != self.size:
            off = (self.resize - self.size) // 2
            t = t[:, off:off + self.size, off:off + self.size]
        return t.contiguous()

    def __repr__(self) -> str:
        return f"PILToTensor(size={self.size}, resize={self.resize})"


def open_image(src, max_pixels: int = augment.AugmentConfig.max_pixels):
    """An eval image (a path or encoded bytes) as an RGB PIL image, as torchvision's default loader gives it,
    except that the size is read from the header first and an image above `max_pixels` (the training
    loader's cap: PIL's own check only warns below twice that) is refused, never decoded. Raises
    augment.BadImage ('too_large' / 'corrupt') naming the file: an eval score must be over the whole split,
    so a broken image is an error, not a skip."""
    from PIL import Image

    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with our cap
            with Image.open(io.BytesIO(src) if name == "<bytes>" else src) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise augment.BadImage("too_large", f"{name}: {w}x{h} > {max_pixels} pixels")
                return img.convert("RGB")
    except augment.BadImage:
        raise
    except Image.DecompressionBombError as e:  # PIL's own hard limit (2x its threshold), raised in open()
        raise augment.BadImage("too_large", f"{name}: {e}") from e
    except Exception as e:  # truncated / not an image / unsupported mode
        raise augment.BadImage("corrupt", f"{name}: {type(e).__name__}: {e}") from e


class WebDatasetSplit(torch.utils.data.IterableDataset):
    """(transform(image), int label) per sample of CLIP_benchmark's webdataset layout ({0..n-1}.tar holding
    <key>.{webp,png,jpg,jpeg} + <key>.cls), read with slip_core.tarsamples. Strict, like open_image: an
    unsafe member, a truncated or corrupt shard, a sample without image or label, or an image that is corrupt
    or over the pixel cap raises, naming shard and sample. Shards are split over DataLoader workers as
    webdataset does; `max_samples` caps each worker's stream (as webdataset's .slice())."""

    def __init__(self, urls: list[str], transform, image_exts: tuple[str, ...], max_samples: int | None = None):
        super().__init__()
        self.urls, self.transform, self.image_exts, self.max_samples = list(urls), transform, image_exts, max_samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        n = 0
        for url in urls:
            fs, path = storage.url_to_fs(url)
            with fs.open(path, "rb") as f:
                for s in tarsamples.iter_samples(f, url):
                    if self.max_samples and n >= self.max_samples:
                        return
                    if "__unsafe__" in s:
                        raise tarsamples.UnsafeMember(f"{url}: {s['__unsafe__']}")
                    ext = next((e for e in self.image_exts if e in s), None)
                    if ext is None or "cls" not in s:
                        what = "an image" if ext is None else "a .cls label"
                        raise ValueError(f"{url}: sample {s['__key__']!r} lacks {what}")
                    try:
                        img = open_image(s[ext])
                    except augment.BadImage as e:
                        raise augment.BadImage(e.reason, f"{url}: sample {s['__key__']!r}: {e}") from e
                    try:
                        label = int(s["cls"])
                    except ValueError:
                        raise ValueError(f"{url}: sample {s['__key__']!r}: .cls is not an integer") from None
                    yield self.transform(img), label
                    n += 1


def zeroshot_transform(size: int) -> PILToTensor:
    return PILToTensor(size)


def probe_eval_transform(size: int) -> PILToTensor:
    return PILToTensor(size, int(round(size * 256 / 224)))


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


def features(lm: LoadedModel, loaded, kind: str, batch_size: int = 256, num_workers: int = 0,
             cache_dir: str | None = None, dataset_sha256: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Frozen image features of one dataset split, cached by (checkpoint, dataset, split, kind, transform,
    sample count). kind: "embed" (projected, for zero-shot/retrieval) or "visual" (pooled ViT feature, probe)."""
    fn = lm.model.encode_image if kind == "embed" else lm.model.visual
    key = cache_key(ckpt=lm.sha256, ds=loaded.name, data=dataset_sha256, split=loaded.split, n=len(loaded),
                    kind=kind, t=repr(loaded.transform), path=loaded.path)
    path = cache_root(cache_dir) / "features" / lm.sha256[:16] / f"{loaded.name}-{loaded.split}-{kind}-{key}.npz"
    out = cached_arrays(path, lambda: dict(zip(("x", "y"), extract(fn, loaded.dataset, batch_size, num_workers))))
    return out["x"], out["y"]
