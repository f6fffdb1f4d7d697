"""Eval-set decontamination: drop training images that also appear in an evaluation dataset.

A training sample whose pHash is within `hamming` bits of any image of an evaluation dataset's TEST split
(the images zero-shot / linear-probe numbers are measured on) is filtered with reason
`eval_overlap:<dataset>`. Web data re-encodes and resizes, so the match is perceptual, not byte-exact
(datasets/quality/fingerprint.py for the hash and its measured margins).

Eval images come from the eval catalog (datasets/catalog.py): every dataset it can `locate` on disk, in any
of its formats (torchvision, imagefolder, filelist, wds), read through `catalog.load`; the local offline sets
are materialised first (`catalog.ensure`). Fingerprints are cached per dataset keyed by
`catalog.fingerprint` (its file contents), so a rebuild does not re-hash ImageNet. The report names the
datasets checked and the ones not available locally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from datasets import offline
from datasets.quality import fingerprint
from datasets.quality.hamming_index import HammingIndex, as_words

OVERLAP_PREFIX = "eval_overlap:"


class EvalUnavailable(FileNotFoundError):
    """An eval dataset of the catalog is not available on this machine."""


IMAGE_FILE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class EvalIndex:
    """Fingerprints of the eval images (dataset, id, phash) + a Hamming index over them."""
    table: pa.Table  # columns: dataset, id, phash
    hamming: int
    checked: dict[str, int]  # dataset -> number of eval images fingerprinted
    unavailable: dict[str, str]  # dataset -> why it was skipped

    def __post_init__(self):
        # index ids = rank in (dataset, id) order, so the smallest id among equally near images is the
        # lexicographically smallest (dataset, id)
        t = self.table.filter(pc.is_valid(self.table["phash"]))
        self._sorted = t.take(pc.sort_indices(t, [("dataset", "ascending"), ("id", "ascending")]))
        self._index = HammingIndex(self.hamming, capacity=len(self._sorted))
        self._index.add(as_words(self._sorted["phash"]))

    def nearest(self, phashes) -> tuple[np.ndarray, np.ndarray]:
        """(row of `sorted_table` or -1, distance) of the nearest eval image per hash ([n, 32] uint8, a list of
        32-byte strings or a fixed_size_binary array)."""
        return self._index.nearest(as_words(phashes))

    def match(self, phash: bytes) -> tuple[int, str, str] | None:
        """(distance, dataset, eval id) of the nearest eval image within `hamming`, else None."""
        (row,), (d,) = self.nearest([phash])
        if row < 0:
            return None
        return int(d), self._sorted["dataset"][int(row)].as_py(), self._sorted["id"][int(row)].as_py()

    @property
    def sorted_table(self) -> pa.Table:
        return self._sorted


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
            if im.size[0] * im.size[1] > fingerprint.MAX_PIXELS:  # header only: a bomb is never decoded
                raise ValueError(f"{p}: {im.size[0]}x{im.size[1]} > {fingerprint.MAX_PIXELS} pixels")
            im.load()
            return im.copy()
    return _fingerprint_images(name, ids, (load(p) for p in files))


def fingerprint_arrays(name: str, images: np.ndarray, prefix: str = "") -> pa.Table:
    return _fingerprint_images(name, [f"{prefix}{i}" for i in range(len(images))], images)


def _catalog_hashes(name: str, root: str | None) -> tuple[list[str], list[bytes]]:
    """(ids, pHashes) of the test split of catalog dataset `name`, read through catalog.load with the
    hash as the transform (so every on-disk format the evaluation accepts is covered)."""
    from datasets import catalog

    loaded = catalog.load(name, "test", transform=fingerprint.phash_image, root=root)
    ds = loaded.dataset
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        hashes = [ds[i][0] for i in range(len(ds))]
        samples = getattr(ds, "samples", None)  # ImageFolder: name images by their file
        ids = [os.path.relpath(p, loaded.path) for p, _ in samples] if samples else [str(i) for i in range(len(ds))]
    else:  # webdataset: in shard order
        hashes = [h for h, _ in ds]
        ids = [str(i) for i in range(len(hashes))]
    return ids, hashes


def _cache_path(name: str, key: str) -> Path:
    return offline.data_dir() / "eval_fingerprints" / f"{name}-{key}.parquet"


def eval_table(name: str, root: str | None = None) -> pa.Table:
    """Fingerprints (dataset, id, phash) of eval dataset `name`'s test split; raises EvalUnavailable
    when it is not on disk (local offline sets are prepared first)."""
    from datasets import catalog, prompts

    try:
        catalog.ensure(name, root)
        catalog.locate(name, "test", root)
        key = catalog.fingerprint(name, root)[:16] + f"-h{fingerprint.HASH_SIZE}"
    except (KeyError, catalog.DatasetMissing, offline.OfflineDataMissing) as e:
        raise EvalUnavailable(str(e).splitlines()[0]) from e
    cache = _cache_path(name, key)
    if cache.exists():
        return pq.read_table(cache)
    try:
        ids, hashes = _catalog_hashes(name, root)
    except prompts.PromptsMissing as e:
        raise EvalUnavailable(f"{name}: {e}") from e
    table = pa.table({"dataset": [name] * len(ids), "id": ids,
                      "phash": pa.array(hashes, pa.binary(fingerprint.PHASH_BYTES))})
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only data dir only costs the recomputation
    return table


def available_datasets() -> list[str]:
    from datasets import catalog

    return list(catalog.CATALOG)


def load_eval_index(names: tuple[str, ...] | list[str] = ("*",), hamming: int = 20, root: str | None = None) -> EvalIndex:
    """Index over the named eval datasets ('*' = every known one); unavailable ones are listed, not fatal
    for '*', fatal when named explicitly."""
    wildcard = "*" in names
    wanted = available_datasets() if wildcard else list(names)
    tables, checked, unavailable = [], {}, {}
    for name in wanted:
        try:
            t = eval_table(name, root)
        except EvalUnavailable as e:
            if not wildcard:
                raise
            unavailable[name] = str(e)
            continue
        tables.append(t)
        checked[name] = len(t)
    table = pa.concat_tables(tables) if tables else pa.table(
        {"dataset": pa.array([], pa.string()), "id": pa.array([], pa.string()), "phash": pa.array([], pa.binary(fingerprint.PHASH_BYTES))})
    return EvalIndex(table, hamming, checked, unavailable)


QUERY_SLICE = 1 << 18  # training hashes looked up at a time: the lookup's arrays stay a few MB


def overlap_table(fingerprints: pa.Table, index: EvalIndex) -> pa.Table:
    """(key, dataset, eval_id, distance) for every fingerprint that matches an eval image (columnar, in
    slices of QUERY_SLICE)."""
    phash = fingerprints["phash"]
    fps = fingerprints.filter(pc.is_valid(phash)) if phash.null_count else fingerprints
    parts = [pa.table({"key": pa.array([], pa.string()), "dataset": pa.array([], pa.string()),
                       "eval_id": pa.array([], pa.string()), "distance": pa.array([], pa.int32())})]
    for s in range(0, len(fps), QUERY_SLICE):
        part = fps.slice(s, QUERY_SLICE)
        rows, dist = index.nearest(part["phash"])
        hit = np.flatnonzero(rows >= 0)
        if len(hit):
            evals = index.sorted_table.take(pa.array(rows[hit]))
            parts.append(pa.table({"key": part["key"].take(pa.array(hit)).cast(pa.string()),
                                   "dataset": evals["dataset"].cast(pa.string()), "eval_id": evals["id"].cast(pa.string()),
                                   "distance": pa.array(dist[hit], pa.int32())}))
    return pa.concat_tables(parts)


def find_overlaps(fingerprints: pa.Table, index: EvalIndex) -> dict[str, tuple[str, str, int]]:
    """{training key: (dataset, eval id, distance)} for every fingerprint that matches an eval image."""
    t = overlap_table(fingerprints, index)
    return {k: (ds, i, d) for k, ds, i, d in zip(*(t[c].to_pylist() for c in t.column_names))}


def overlap_report(overlaps: pa.Table | dict, index: EvalIndex, max_examples: int = 20) -> dict:
    """Per eval dataset: images checked, training samples removed, and example (key, eval id, distance).
    `overlaps`: overlap_table's table (or find_overlaps' dict)."""
    if isinstance(overlaps, dict):
        overlaps = pa.table({"key": pa.array(list(overlaps), pa.string()),
                             "dataset": pa.array([v[0] for v in overlaps.values()], pa.string()),
                             "eval_id": pa.array([v[1] for v in overlaps.values()], pa.string()),
                             "distance": pa.array([v[2] for v in overlaps.values()], pa.int32())})
    counts = dict(zip(*(overlaps.group_by("dataset").aggregate([("key", "count")])[c].to_pylist()
                        for c in ("dataset", "key_count")))) if len(overlaps) else {}
    datasets = {}
    for ds, n in sorted(index.checked.items()):
        ex = overlaps.filter(pc.equal(overlaps["dataset"], ds)) if ds in counts else overlaps.slice(0, 0)
        ex = ex.take(pc.sort_indices(ex["key"])[:max_examples]) if len(ex) else ex
        datasets[ds] = {"eval_images": n, "overlapping_samples": counts.get(ds, 0),
                        "examples": [{"key": k, "eval_id": i, "distance": d} for k, i, d in
                                     zip(ex["key"].to_pylist(), ex["eval_id"].to_pylist(), ex["distance"].to_pylist())]}
    return {"hamming": index.hamming, "unavailable": index.unavailable, "datasets": datasets}
