"""Reading evaluation images, strictly: a pixel-capped opener, CLIP_benchmark's labelled webdataset split,
and the reference val transform on a PIL image.

Generic (no dataset specifics): the eval catalog (datasets/catalog.py) and the evaluation tasks
(evaluation/) build on these. An eval score must cover the whole split, so a broken image or shard is an
error naming it, never a skip.
"""
from __future__ import annotations

import io
import warnings
from typing import Iterator

import numpy as np
import torch

from slip_core import augment, storage, tarsamples


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


def strict_samples(url: str, image_exts: tuple[str, ...], label_ext: str) -> Iterator[tuple[str, str, bytes, bytes]]:
    """(key, image extension, image bytes, label bytes) per sample of one webdataset shard, read with
    slip_core.tarsamples. Strict: an unsafe member, a truncated or corrupt shard, or a sample without an image
    or without its `label_ext` member raises, naming shard and sample."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as f:
        for s in tarsamples.iter_samples(f, url):
            if "__unsafe__" in s:
                raise tarsamples.UnsafeMember(f"{url}: {s['__unsafe__']}")
            ext = next((e for e in image_exts if e in s), None)
            if ext is None or label_ext not in s:
                what = "an image" if ext is None else f"a .{label_ext} label"
                raise ValueError(f"{url}: sample {s['__key__']!r} lacks {what}")
            yield s["__key__"], ext, s[ext], s[label_ext]


def open_sample_image(url: str, key: str, data: bytes):
    """open_image for a shard sample, the error naming shard and sample."""
    try:
        return open_image(data)
    except augment.BadImage as e:
        raise augment.BadImage(e.reason, f"{url}: sample {key!r}: {e}") from e


def _worker_part(urls: list[str]) -> list[str]:
    info = torch.utils.data.get_worker_info()
    return urls if info is None else urls[info.id::info.num_workers]


def _rank_part(items: list, rank: int, world: int) -> list:
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


class WebDatasetSplit(torch.utils.data.IterableDataset):
    """(transform(image), int label) per sample of CLIP_benchmark's webdataset layout ({0..n-1}.tar holding
    <key>.{webp,png,jpg,jpeg} + <key>.cls). Strict (strict_samples; an image that is corrupt or over the pixel
    cap raises too). Shards are split over DataLoader workers as webdataset does; `max_samples` caps each
    worker's stream (as webdataset's .slice(), so the total depends on workers and ranks). `shard(rank, world)`
    is one rank's contiguous block of shards (feature extraction under torchrun)."""

    def __init__(self, urls: list[str], transform, image_exts: tuple[str, ...], max_samples: int | None = None):
        super().__init__()
        self.urls, self.transform, self.image_exts, self.max_samples = list(urls), transform, image_exts, max_samples

    def shard(self, rank: int, world: int) -> "WebDatasetSplit":
        return WebDatasetSplit(_rank_part(self.urls, rank, world), self.transform, self.image_exts, self.max_samples)

    def __iter__(self):
        n = 0
        for url in _worker_part(self.urls):
            for key, _, image, cls in strict_samples(url, self.image_exts, "cls"):
                if self.max_samples and n >= self.max_samples:
                    return
                img = open_sample_image(url, key, image)
                try:
                    label = int(cls)
                except ValueError:
                    raise ValueError(f"{url}: sample {key!r}: .cls is not an integer") from None
                yield self.transform(img), label
                n += 1


def shard_captions(urls: list[str], image_exts: tuple[str, ...]) -> tuple[list[list[str]], list[int]]:
    """CLIP_benchmark's retrieval webdataset (<key>.<image> + <key>.txt, one caption per line): (captions per
    sample in shard order, samples per shard). Reads the shards without decoding an image."""
    captions, counts = [], []
    for url in urls:
        before = len(captions)
        for key, _, _, txt in strict_samples(url, image_exts, "txt"):
            lines = [c for c in txt.decode("utf-8").splitlines() if c.strip()]
            if not lines:
                raise ValueError(f"{url}: sample {key!r} has no caption")
            captions.append(lines)
        counts.append(len(captions) - before)
    return captions, counts


class CaptionedShards(torch.utils.data.IterableDataset):
    """(transform(image), index of the sample in the whole split) per sample of a retrieval webdataset;
    `offsets[i]` = samples before shard i (from shard_captions). Strict as WebDatasetSplit; shardable."""

    def __init__(self, urls: list[str], offsets: list[int], transform, image_exts: tuple[str, ...]):
        super().__init__()
        self.urls, self.offsets, self.transform, self.image_exts = list(urls), list(offsets), transform, image_exts

    def shard(self, rank: int, world: int) -> "CaptionedShards":
        return CaptionedShards(_rank_part(self.urls, rank, world), _rank_part(self.offsets, rank, world),
                               self.transform, self.image_exts)

    def __iter__(self):
        offset = dict(zip(self.urls, self.offsets))
        for url in _worker_part(self.urls):
            for i, (key, _, image, _) in enumerate(strict_samples(url, self.image_exts, "txt")):
                yield self.transform(open_sample_image(url, key, image)), offset[url] + i
