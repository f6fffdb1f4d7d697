"""The retrieval catalog: captioned sets for zero-shot image<->text retrieval, catalogued like the
classification sets (datasets/catalog.py): where each lives under the eval data root, which on-disk forms are
accepted, and how to obtain it. Nothing is downloaded; a missing set raises catalog.DatasetMissing naming the
paths looked at.

Accepted forms of `coco` (MS-COCO 2014, Karpathy's 5k test split) and `flickr30k` (Karpathy's 1k test split):
* `karpathy`: `<root>/<name>/dataset_<name>.json` as Karpathy released it ({"images": [{"filepath"
  (COCO only), "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}) + the images: COCO at
  `<root>/coco/<filepath>/<filename>` (val2014/...), Flickr30k at `<root>/flickr30k/flickr30k-images/<filename>`
  (or `images/`);
* `wds`: CLIP_benchmark's retrieval webdataset `<root>/<name>/test/{0..n-1}.tar` + `nshards.txt` (+
  `dataset_type.txt` = retrieval), each sample `<key>.{webp,png,jpg,jpeg}` + `<key>.txt` (captions, one a line),
  as `clip_benchmark_export_wds` writes it;
* `jsonl`: `<root>/<name>/captions.jsonl`, lines {"image": "<path relative to the folder>", "captions": [...]}
  (any captioned set, under any name).
`photos`: the 20 real photos shipped in our dependencies' wheels, title + description each (datasets.offline).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import offline
from datasets.catalog import IMAGE_EXTS, DatasetMissing, data_root, fingerprint_files


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    karpathy_json: str  # Karpathy's file name
    image_dirs: tuple[str, ...]  # image folders under <root>/<name> tried in order ("" = the JSON's filepath)
    obtain: str
    split: str = "test"  # Karpathy split evaluated (CLIP_benchmark's and the papers')


_KARPATHY = "Karpathy's splits: cs.stanford.edu/people/karpathy/deepimagesent (caption_datasets.zip)"
RETRIEVAL_CATALOG: dict[str, RetrievalSet] = {s.name: s for s in [
    RetrievalSet("coco", "dataset_coco.json", ("",),
                 "COCO 2014 val images (cocodataset.org, val2014/) + dataset_coco.json from " + _KARPATHY
                 + "; or `clip_benchmark_export_wds --dataset mscoco_captions --split test` into <root>/coco"),
    RetrievalSet("flickr30k", "dataset_flickr30k.json", ("flickr30k-images", "images"),
                 "the Flickr30k images (shannon.cs.illinois.edu/DenotationGraph, flickr30k-images/) + "
                 "dataset_flickr30k.json from " + _KARPATHY
                 + "; or `clip_benchmark_export_wds --dataset flickr30k --split test` into <root>/flickr30k"),
]}
OFFLINE_SETS = ("photos",)


@dataclass
class CaptionedSplit:
    name: str
    format: str  # karpathy | wds | jsonl | offline
    path: str
    images: list[str] | None  # image files (karpathy, jsonl, offline); None for wds
    captions: list[list[str]]  # per image, in image order
    shards: list[str] | None = None  # wds shard URLs
    shard_counts: list[int] | None = None  # wds samples per shard

    def __len__(self) -> int:
        return len(self.captions)


def _karpathy(spec: RetrievalSet, base: Path) -> CaptionedSplit:
    with open(base / spec.karpathy_json, encoding="utf-8") as f:
        rows = [im for im in json.load(f)["images"] if im.get("split") == spec.split]
    if not rows:
        raise ValueError(f"{base / spec.karpathy_json}: no image in Karpathy split {spec.split!r}")
    images, captions = [], []
    for im in rows:
        names = [base / (d or im.get("filepath", "")) / im["filename"] for d in spec.image_dirs]
        path = next((p for p in names if p.is_file()), None)
        if path is None:  # an eval score covers the whole split: a missing image is an error
            raise DatasetMissing(f"{spec.name}: image {im['filename']!r} of {spec.karpathy_json} not found; looked "
                                 f"at {', '.join(str(p) for p in names)}")
        images.append(str(path))
        captions.append([s["raw"] for s in im["sentences"]])
    return CaptionedSplit(spec.name, "karpathy", str(base), images, captions)


def _wds(name: str, base: Path) -> CaptionedSplit:
    from slip_core.eval_images import shard_captions

    n = int((base / "test" / "nshards.txt").read_text().strip())
    kind = (base / "dataset_type.txt").read_text().strip().lower() if (base / "dataset_type.txt").exists() else ""
    if kind and kind != "retrieval":
        raise ValueError(f"{base}: dataset_type.txt says {kind!r}, not a retrieval set")
    shards = [str(base / "test" / f"{i}.tar") for i in range(n)]
    captions, counts = shard_captions(shards, IMAGE_EXTS)
    return CaptionedSplit(name, "wds", str(base), None, captions, shards, counts)


def _jsonl(name: str, base: Path) -> CaptionedSplit:
    images, captions = [], []
    for line in (base / "captions.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            images.append(row["image"] if Path(row["image"]).is_absolute() else str(base / row["image"]))
            captions.append(list(row["captions"]))
    return CaptionedSplit(name, "jsonl", str(base), images, captions)


def load(name: str, root: str | None = None) -> CaptionedSplit:
    """The test split of a captioned set in the first accepted form found; DatasetMissing otherwise."""
    if name == "photos":
        photos = offline.photo_corpus()
        return CaptionedSplit(name, "offline", "(package data)", [p.path for p in photos],
                              [[p.title, p.description] for p in photos])
    base = data_root(root) / name
    spec = RETRIEVAL_CATALOG.get(name)
    looked = []
    if spec is not None:
        looked.append(f"{base / spec.karpathy_json} + images under {base}/"
                      + " or ".join(f"{d or '<filepath>'}/" for d in spec.image_dirs))
        if (base / spec.karpathy_json).is_file():
            return _karpathy(spec, base)
    looked.append(f"{base}/test/nshards.txt + {{0..n-1}}.tar (CLIP_benchmark retrieval webdataset)")
    if (base / "test" / "nshards.txt").is_file():
        return _wds(name, base)
    looked.append(f"{base}/captions.jsonl")
    if (base / "captions.jsonl").is_file():
        return _jsonl(name, base)
    hint = spec.obtain if spec else 'write <root>/<name>/captions.jsonl lines {"image": ..., "captions": [...]}'
    raise DatasetMissing(f"captioned set {name!r} not found. Looked for:\n  " + "\n  ".join(looked)
                         + f"\nTo obtain it: {hint}. (Set SLIP_EVAL_DATA or --data-root to change the root; "
                         "the offline set 'photos' needs nothing.)")


def fingerprint(name: str, root: str | None = None) -> str:
    """sha256 of what a retrieval number depends on: the captions and the image files (or shards)."""
    split = load(name, root)
    files = split.shards if split.images is None else split.images
    h = hashlib.sha256(json.dumps(split.captions).encode())
    h.update(fingerprint_files(files, os.path.commonpath(files) if len(files) > 1 else "").encode())
    return h.hexdigest()
