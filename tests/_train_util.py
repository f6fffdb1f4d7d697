"""Real webdataset shards for the loader/trainer tests, built without img2dataset.

Same artifact layout as the dataset stage (contracts.md): shards/NNNNN.tar with <key>.jpg/.txt/.json
(json carries YFCC-style `title` and `description`), sizes.json, and a published manifest with
metrics.num_samples. Images are real: Fashion-MNIST train digits (upscaled to 64 px) and the photo corpus.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import webdataset as wds
from PIL import Image

from datasets.offline import FASHION_CLASSES, fashion_mnist, photo_corpus
from slip_core import artifacts, storage


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def fashion_samples(n: int, seed: int = 0, size: int = 64, split: str = "train"):
    """(jpg bytes, title, description, label) for n Fashion-MNIST images, class-balanced-ish by RNG."""
    images, labels = fashion_mnist(split)
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    out = []
    for j, i in enumerate(idx):
        name = FASHION_CLASSES[int(labels[i])]
        img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC)
        # Some descriptions are empty, as in YFCC: the strict caption mode must fall back to the title.
        desc = "" if j % 3 == 0 else f"my {name}, photographed on a plain background"
        out.append((jpeg_bytes(img), f"a photo of a {name}", desc, int(labels[i])))
    return out


def photo_samples(short_side: int = 256):
    out = []
    for p in photo_corpus():
        img = Image.open(p.path).convert("RGB")
        s = short_side / min(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BICUBIC)
        out.append((jpeg_bytes(img), p.title, p.description, -1))
    return out


def write_dataset(root: str, samples, per_shard: int, extra_bad: dict | None = None, name: str = "test") -> str:
    """Write shards + sizes.json + manifest under `root`; returns the manifest URL.

    `extra_bad` maps shard index -> list of (key, {ext: bytes}) raw samples appended to that shard
    (corrupt images, caption-less samples, ...), which are counted in sizes.json like img2dataset would not."""
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    sizes, rel = {}, []
    n_shards = (len(samples) + per_shard - 1) // per_shard
    for s in range(n_shards):
        path = f"shards/{s:05d}.tar"
        chunk = samples[s * per_shard:(s + 1) * per_shard]
        with wds.TarWriter(os.path.join(root, path)) as tw:
            for j, (jpg, title, desc, label) in enumerate(chunk):
                key = f"{s:05d}{j:04d}"
                meta = {"key": key, "title": title, "description": desc, "label": label, "status": "success"}
                tw.write({"__key__": key, "jpg": jpg, "txt": title, "json": json.dumps(meta).encode()})
            for key, fields in (extra_bad or {}).get(s, []):
                tw.write({"__key__": key, **fields})
        sizes[path] = len(chunk)
        rel.append(path)
    storage.atomic_write_text(os.path.join(root, "sizes.json"), json.dumps(sizes, indent=1))
    rel.append("sizes.json")
    m = artifacts.build_manifest(root, rel, kind="dataset", name=name, config={"source": "tests"},
                                 metrics={"num_samples": sum(sizes.values())})
    return artifacts.publish(m, root)


def fashion_dataset(root: str, n: int = 600, per_shard: int = 100, photos: bool = True, seed: int = 0) -> str:
    samples = fashion_samples(n, seed=seed)
    if photos:
        samples += photo_samples()
    order = np.random.default_rng(seed + 1).permutation(len(samples))
    return write_dataset(root, [samples[i] for i in order], per_shard)
