"""Image fingerprints, computed once per downloaded image: a perceptual hash + the byte hash.

* `phash` is a 256-bit DCT perceptual hash (the `imagehash` library, hash_size=16: grayscale, resize to
  64x64, 2-D DCT, keep the 16x16 lowest frequencies, threshold at their median). It survives resizing and
  JPEG re-encoding: on the 20 offline photos, copies resized to a 256/128 px short side and re-encoded at
  JPEG quality 95..50 stay within 12 bits (quality 30 at 128 px: 24), while distinct images are >= 106 bits
  apart. 64-bit pHash (hash_size=8) was measured too and rejected: among 2,000 distinct Fashion-MNIST
  images, 107 pairs were within 4 bits (tests/test_fingerprint.py measures the 256-bit rate).
* `sha256` is the hash of the image bytes stored in the shard; `orig_sha256` the hash img2dataset computed
  on the *downloaded original* (its `sha256` metadata column), when present. Exact duplicates are judged on
  `orig_sha256 or sha256`.

Shard tars are read as a stream (datasets.tarshards) and are untrusted input: links, devices and members
whose names are absolute, have `..` or control characters are skipped and counted; truncated tars raise;
images above the loader's pixel cap are never decoded (error 'too_large'). JPEGs are decoded in draft mode
(libjpeg DCT scaling to >= 128 px, twice the hash's input size): bench/fingerprint.py measures the speed-up.

Shards are hashed in parallel (`map_shards`, `fingerprint_ledger`) on a hash engine (hash_engines.py,
`DatasetConfig.hash_engine`): `processes` (a local fork pool, default), `dask://host:port` (a running
Dask scheduler's workers) or `spark` / `spark://host:7077` (the active SparkSession, else one built like
the pyspark distributor's, datasets/img2dataset_spark.session; tables come back as Arrow IPC bytes). The
same function (`shard_fingerprints`) runs everywhere, results come back in shard order, and each worker
writes its shard's cache atomically next to the group's out/ folder, so on a cluster the store must be
shared. Shards already cached are read on the caller and never sent. SLIP_DASK_SCHEDULER=host:port
overrides the configured engine. The engine is an execution setting (PARALLEL_FIELDS), never an identity.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
from typing import Iterable, Iterator

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from datasets import tarshards
from datasets.quality import hash_engines
from slip_core import storage

log = logging.getLogger(__name__)
HASH_SIZE = 16  # imagehash hash_size -> HASH_SIZE**2 = 256 bits
PHASH_BYTES = HASH_SIZE * HASH_SIZE // 8
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 89_478_485  # the loader's cap (augment.AugmentConfig.max_pixels); PIL only warns below 2x this
DRAFT_SIDE = 8 * HASH_SIZE  # 2x the 64 px imagehash resizes to: DCT-scaled decoding at 1x added up to 18 bits

FINGERPRINT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("sha256", pa.string()),  # of the stored image bytes
    ("orig_sha256", pa.string()),  # img2dataset's hash of the downloaded original ('' if unknown)
    ("phash", pa.binary(PHASH_BYTES)),  # '' bytes never: undecodable images have error != ''
    ("width", pa.int32()),  # stored image
    ("height", pa.int32()),
    ("orig_width", pa.int32()),  # before img2dataset resized it (= width when unknown)
    ("orig_height", pa.int32()),
    ("caption", pa.string()),  # the .txt caption
    ("alt_captions", pa.list_(pa.string())),  # other caption candidates in the metadata (YFCC title/description)
    ("error", pa.string()),  # '' = fine; else why no phash (the sample gets filtered: undecodable_image)
])


# ------------------------------------------------------------------------------------------ hashing

def phash_image(img: Image.Image) -> bytes:
    """256-bit perceptual hash of a PIL image, as 32 bytes (row-major bits of the 16x16 DCT sign map)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA").convert("RGB") if "A" in img.mode or img.mode == "P" else img.convert("RGB")
    bits = imagehash.phash(img, hash_size=HASH_SIZE).hash.reshape(-1)
    return np.packbits(bits).tobytes()


def phash_array(arr: np.ndarray) -> bytes:
    """pHash of a uint8 [H, W] or [H, W, 3] array (eval sets kept as arrays, e.g. Fashion-MNIST)."""
    return phash_image(Image.fromarray(np.ascontiguousarray(arr)))


def decode(data: bytes, draft: bool = True) -> Image.Image:
    """Decode image bytes; for JPEG, `draft` lets libjpeg scale down by 1/2..1/8 while decoding (never
    below DRAFT_SIDE px on the short side), which the 64 px hash input does not notice."""
    img = Image.open(io.BytesIO(data))
    _check_pixels(img)
    if draft and img.format == "JPEG":
        img.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
    img.load()
    return img


def _check_pixels(img: Image.Image) -> None:
    """Refuse an opened (header-only) image above MAX_PIXELS before anything is decoded."""
    if img.size[0] * img.size[1] > MAX_PIXELS:
        raise ValueError(f"too_large: {img.size[0]}x{img.size[1]} > {MAX_PIXELS} pixels")


def fingerprint_bytes(data: bytes, draft: bool = True) -> dict:
    """{sha256, phash, width, height, error} of one encoded image (width/height of the full image)."""
    out = {"sha256": hashlib.sha256(data).hexdigest(), "phash": None, "width": None, "height": None, "error": ""}
    try:
        with Image.open(io.BytesIO(data)) as img:
            out["width"], out["height"] = img.size  # before draft() shrinks it
            _check_pixels(img)
            if draft and img.format == "JPEG":
                img.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
            img.load()
            out["phash"] = phash_image(img)
    except Exception as e:  # a corrupt or hostile file is a recorded reason, not a crash
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two [N, 32] uint8 hash arrays (for measurements and tests)."""
    a64, b64 = a.view(np.uint64), b.view(np.uint64)
    return np.bitwise_count(a64[:, None, :] ^ b64[None, :, :]).sum(-1)


def phash_matrix(hashes: Iterable[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, PHASH_BYTES)


# ------------------------------------------------------------------------------------ reading shards

safe_member_name = tarshards.split_name  # (key, ext) of a member name, None if unsafe or not a sample member


def iter_tar_samples(tar_url: str,
                     skipped: collections.Counter | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, in file order. Members that are not regular files
    or whose names are unsafe are left out, counted by reason in `skipped` and logged; a truncated or corrupt
    tar raises tarshards.BadTar. Members come from datasets.tarshards (a header reader ~5x cheaper per member
    than tarfile)."""
    fs, path = storage.url_to_fs(tar_url)
    skipped = collections.Counter() if skipped is None else skipped
    before = sum(skipped.values())
    with fs.open(path, "rb") as f:
        cur, sample = None, {}
        for name, data in tarshards.iter_members(f, skipped):
            parsed = safe_member_name(name)
            if parsed is None:
                continue
            key, ext = parsed
            if key != cur and sample:
                yield cur, sample
                sample = {}
            cur = key
            sample[ext] = data
        if sample:
            yield cur, sample
    if sum(skipped.values()) > before:
        log.warning("%s: skipped unsafe tar members (cumulative): %s", tar_url, dict(skipped))


def fingerprint_sample(key: str, sample: dict[str, bytes], draft: bool = True) -> dict:
    """One FINGERPRINT_SCHEMA row from a webdataset sample (image + optional .txt caption + .json metadata)."""
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        fp = {"sha256": "", "phash": None, "width": None, "height": None, "error": "no image member"}
    else:
        fp = fingerprint_bytes(sample[ext], draft)
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else str(meta.get("caption") or "")
    # YFCC samples carry title and description; the loader picks the caption at load time (SPEC §9.1)
    alt = [str(meta[f]) for f in ("title", "description") if isinstance(meta.get(f), str) and meta[f].strip() and meta[f] != caption]
    return {"key": key, "sha256": fp["sha256"], "orig_sha256": str(meta.get("sha256") or ""), "phash": fp["phash"],
            "width": fp["width"], "height": fp["height"],
            "orig_width": meta.get("original_width") or fp["width"], "orig_height": meta.get("original_height") or fp["height"],
            "caption": caption, "alt_captions": alt, "error": fp["error"]}


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FINGERPRINT_SCHEMA)


def fingerprint_tars(tar_urls: Iterable[str], key_map: dict[tuple[str, str], str] | None = None,
                     draft: bool = True) -> pa.Table:
    """Fingerprints of every sample in `tar_urls`. With `key_map` {(tar_url, tar key): dataset key} only the
    mapped samples are kept, under their dataset key (img2dataset keys restart per attempt)."""
    parts = [to_table([])]
    for url in tar_urls:  # one shard's rows as Python dicts at a time
        rows = []
        for key, sample in iter_tar_samples(url):
            if key_map is not None:
                key = key_map.get((url, key))
                if key is None:
                    continue
            rows.append(fingerprint_sample(key, sample, draft))
        parts.append(to_table(rows))
    return pa.concat_tables(parts)


def shard_url(gpath: str, shard) -> str:
    """The img2dataset tar of shard id `shard` of the group at `gpath` (a ledger `source`'s first two parts)."""
    return storage.join(gpath, "out", f"{int(shard):05d}.tar")


def ledger_sources(ledger: pa.Table) -> tuple[list[str], pa.Table]:
    """(tars, sources) for the ledger's `success` rows, from its `source` column ('<group path>|<shard id>|
    <img2dataset key>', datasets/ledger.py): the tars in order of first use, and a table (tar: index into
    tars, i2d_key, key) sorted by tar (stable). Columnar: one Python string per tar, none per row."""
    succ = ledger.filter(pc.equal(ledger["status"], "success"))
    parts = pc.split_pattern(succ["source"], "|")
    group = pc.dictionary_encode(pc.binary_join_element_wise(pc.list_element(parts, 0), pc.list_element(parts, 1), "|"))
    group = group.combine_chunks() if isinstance(group, pa.ChunkedArray) else group
    tars = [shard_url(*g.split("|")) for g in group.dictionary.to_pylist()]  # dictionary: order of first use
    table = pa.table({"tar": group.indices.cast(pa.int32()), "i2d_key": pc.list_element(parts, 2), "key": succ["key"]})
    return tars, table.take(pc.sort_indices(table["tar"]))


def _by_tar(sources: pa.Table, n_tars: int) -> list[pa.Table]:
    """ledger_sources' table cut into one slice per tar."""
    bounds = np.searchsorted(sources["tar"].to_numpy(), np.arange(n_tars + 1))
    return [sources.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def keyed(table: pa.Table, i2d_keys, keys) -> pa.Table:
    """The rows of one shard's fingerprints (keyed by img2dataset key) that `i2d_keys` lists, under the
    matching dataset `keys`, in shard order."""
    idx = pc.index_in(table["key"], value_set=pa.array(i2d_keys) if isinstance(i2d_keys, list) else i2d_keys)
    hit = pc.is_valid(idx)
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    return table.filter(hit).set_column(0, "key", keys.take(idx.filter(hit)).cast(pa.string()))


def iter_source_samples(shards: Iterable[tuple[str, pa.Array, pa.Array]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(dataset key, sample) per (tar url, i2d keys, dataset keys): the listed samples of each shard."""
    for url, i2d_keys, keys in shards:
        key_of = dict(zip(i2d_keys.to_pylist(), keys.to_pylist()))  # one shard's worth
        for key, sample in iter_tar_samples(url):
            k = key_of.get(key)
            if k is not None:
                yield k, sample


def iter_ledger_samples(ledger: pa.Table) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(dataset key, sample) for every success row of the ledger, read from its img2dataset shard."""
    tars, sources = ledger_sources(ledger)
    return iter_source_samples((u, s["i2d_key"], s["key"]) for u, s in zip(tars, _by_tar(sources, len(tars))))


CACHE_DIR = f"fingerprints-v1-h{HASH_SIZE}-d{DRAFT_SIDE}"  # a different hash/decode never reuses a cache


def cache_url(tar_url: str) -> str | None:
    gpath, name = tar_url.rsplit("/out/", 1) if "/out/" in tar_url else (None, None)
    return storage.join(gpath, CACHE_DIR, name.replace(".tar", ".parquet")) if gpath else None


def shard_fingerprints(tar_url: str, cache: bool = True, draft: bool = True) -> pa.Table:
    """Fingerprints of one img2dataset shard (keyed by img2dataset key), cached next to the group's out/
    folder: a complete shard never changes, so each image is decoded and hashed once, however often the
    dataset is re-published (new quality settings, retries of other rows)."""
    target = cache_url(tar_url) if cache else None
    if target and storage.exists(target):
        fs, p = storage.url_to_fs(target)
        with fs.open(p, "rb") as f:
            return pq.read_table(f)
    table = fingerprint_tars([tar_url], draft=draft)
    if target:
        with storage.atomic_open(target, "wb") as f:
            pq.write_table(table, f)
    return table


def _shard_task(args: tuple) -> pa.Table:
    url, cache, draft = args
    return shard_fingerprints(url, cache, draft)


def map_shards(tars: list[str], cache: bool = True, draft: bool = True, workers: int | None = None,
               engine: str = "processes") -> list[pa.Table]:
    """shard_fingerprints over `tars`, in order, on the hash engine `engine` names (hash_engines: a local
    process pool of `workers`, a Dask scheduler, Spark; SLIP_DASK_SCHEDULER overrides). The same function
    runs everywhere and writes each shard's cache where it ran, so a cluster needs a shared store. Shards
    whose cache exists are read here and never sent anywhere."""
    out: list[pa.Table | None] = [None] * len(tars)
    todo = []
    for i, url in enumerate(tars):
        cached = cache_url(url) if cache else None
        if cached and storage.exists(cached):
            out[i] = shard_fingerprints(url, cache, draft)
        else:
            todo.append(i)
    results = hash_engines.map_ordered(_shard_task, [(tars[i], cache, draft) for i in todo], engine, workers)
    for i, t in zip(todo, results):
        out[i] = t
    return out


def fingerprint_ledger(ledger: pa.Table, cache: bool = True, draft: bool = True, workers: int | None = None,
                       engine: str = "processes") -> pa.Table:
    """Fingerprints of the ledger's `success` rows, keyed by dataset key (per-shard cached, see above;
    shards hashed in parallel on `engine`, map_shards). All in memory: the dataset stage streams instead
    (ensure_cached + iter_fingerprints)."""
    tars, sources = ledger_sources(ledger)
    parts = [keyed(t, src["i2d_key"], src["key"])
             for t, src in zip(map_shards(tars, cache, draft, workers, engine), _by_tar(sources, len(tars)))]
    table = pa.concat_tables(parts) if parts else to_table([])
    if len(table) != len(sources):
        raise RuntimeError(f"{len(sources) - len(table)} success rows of the ledger are not in the shards they name")
    return table


def _cache_task(args: tuple) -> int:
    url, draft = args
    return len(shard_fingerprints(url, True, draft))


def ensure_cached(tars: list[str], draft: bool = True, workers: int | None = None, engine: str = "processes") -> int:
    """Hash every shard of `tars` whose fingerprint cache is missing, on `engine` (as map_shards; only row
    counts come back, the tables stay in the caches). Returns the number of images hashed now."""
    todo = [(u, draft) for u in tars if not storage.exists(cache_url(u) or "")]
    return sum(hash_engines.map_ordered(_cache_task, todo, engine, workers)) if todo else 0


def iter_fingerprints(shards: Iterable[tuple[str, pa.Array, pa.Array]], draft: bool = True) -> Iterator[pa.Table]:
    """Per (tar url, i2d keys, dataset keys): that shard's fingerprints of the listed samples under their
    dataset keys (from its cache, computed here if missing). One shard in memory at a time."""
    for url, i2d_keys, keys in shards:
        t = keyed(shard_fingerprints(url, True, draft), i2d_keys, keys)
        if len(t) != len(keys):
            raise RuntimeError(f"{len(keys) - len(t)} success rows of the ledger are not in {url}")
        yield t


def last_per_key(t: pa.Table) -> pa.Table:
    """Rows sorted by key, one per key (the last one given, as a dict built from the rows would keep).
    A table already sorted by unique key is returned as is (no copy)."""
    keys = t["key"]
    if len(keys) < 2 or pc.all(pc.less(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py():
        return t
    order = pc.sort_indices(t["key"]).to_numpy()  # stable
    keys = t["key"].take(pa.array(order))
    last = np.r_[pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False), True] \
        if len(keys) else np.zeros(0, bool)
    return t.take(pa.array(order[last]))


# The fingerprint columns a published ledger carries (issue 10: "stored in the ledger"); null for rows that
# are not images of the dataset (failed downloads). phash as 64 hex digits: readable and joinable anywhere.
LEDGER_COLUMNS = (("image_sha256", pa.string()), ("orig_sha256", pa.string()), ("phash", pa.string()))


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE = np.full(256, 255, np.uint8)  # ASCII byte -> hex digit value, 255 = not a hex digit
_NIBBLE[_HEX] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def phash_hex(phash) -> pa.ChunkedArray:
    """64 lowercase hex digits per pHash (null stays null), in numpy: no Python string per row."""
    arr = phash.combine_chunks() if isinstance(phash, pa.ChunkedArray) else phash
    valid = pc.is_valid(arr)
    raw = as_bytes_matrix(arr.fill_null(b"\0" * PHASH_BYTES) if arr.null_count else arr)
    chunks = []
    for s in range(0, len(raw), 1 << 20):  # int32 offsets: 64 bytes * 1M rows per chunk
        b = raw[s:s + (1 << 20)]
        chars = np.empty((len(b), 2 * PHASH_BYTES), np.uint8)
        chars[:, 0::2], chars[:, 1::2] = _HEX[b >> 4], _HEX[b & 15]
        offsets = np.arange(len(b) + 1, dtype=np.int32) * (2 * PHASH_BYTES)
        chunks.append(pa.StringArray.from_buffers(len(b), pa.py_buffer(offsets), pa.py_buffer(chars)))
    out = pa.chunked_array(chunks, pa.string())
    return pc.if_else(valid, out, pa.scalar(None, pa.string())) if arr.null_count else out


def phash_from_hex(hexes) -> pa.Array:
    """binary(32) pHashes from 64-digit hex strings (no nulls); a malformed value raises ValueError."""
    arr = (hexes.combine_chunks() if isinstance(hexes, pa.ChunkedArray) else hexes).cast(pa.large_string())
    n = len(arr)
    if not n:
        return pa.array([], pa.binary(PHASH_BYTES))
    if arr.null_count:
        raise ValueError("phash_from_hex: null values")
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + n + 1]
    if (np.diff(offsets) != 2 * PHASH_BYTES).any():
        raise ValueError(f"phash values must be {2 * PHASH_BYTES} hex digits")
    nib = _NIBBLE[np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(n, 2 * PHASH_BYTES)]
    if (nib == 255).any():
        raise ValueError("phash values must be hex digits")
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(PHASH_BYTES), n, [None, pa.py_buffer(raw.tobytes())])


def as_bytes_matrix(phash: pa.Array) -> np.ndarray:
    """[n, 32] uint8 view of a binary(32) array without nulls."""
    if not pa.types.is_fixed_size_binary(phash.type):
        phash = phash.cast(pa.binary(PHASH_BYTES))
    buf = np.frombuffer(phash.buffers()[1], np.uint8)
    return buf[phash.offset * PHASH_BYTES:(phash.offset + len(phash)) * PHASH_BYTES].reshape(-1, PHASH_BYTES)


def attach_to_ledger(ledger: pa.Table, fingerprints: pa.Table) -> pa.Table:
    """The ledger with LEDGER_COLUMNS appended (replaced if present), joined on key (columnar)."""
    fp = last_per_key(fingerprints.select(["key", "sha256", "orig_sha256", "phash"]))
    idx = pc.index_in(ledger["key"], value_set=fp["key"].combine_chunks())
    cols = {"image_sha256": fp["sha256"], "orig_sha256": fp["orig_sha256"], "phash": phash_hex(fp["phash"])}
    for name, typ in LEDGER_COLUMNS:
        col = cols[name].combine_chunks().take(idx).cast(typ)
        if name in ledger.column_names:
            ledger = ledger.set_column(ledger.column_names.index(name), name, col)
        else:
            ledger = ledger.append_column(name, col)
    return ledger


def from_ledger(ledger: pa.Table) -> pa.Table:
    """(key, sha256, orig_sha256, phash bytes) of the rows of a published ledger that have a fingerprint."""
    missing = [n for n, _ in LEDGER_COLUMNS if n not in ledger.column_names]
    if missing:
        raise KeyError(f"ledger has no fingerprint columns {missing} (published without the quality pass)")
    t = ledger.filter(pc.fill_null(pc.not_equal(ledger["phash"], ""), False))
    return pa.table({"key": t["key"], "sha256": t["image_sha256"], "orig_sha256": t["orig_sha256"],
                     "phash": phash_from_hex(t["phash"])})


def fingerprint_arrays(images: np.ndarray, ids: list[str] | None = None) -> pa.Table:
    ids = ids if ids is not None else [str(i) for i in range(len(images))]
    rows = []
    for k, arr in zip(ids, images):
        h, w = arr.shape[:2]
        rows.append({"key": k, "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
                     "orig_sha256": "", "phash": phash_array(arr), "width": w, "height": h,
                     "orig_width": w, "orig_height": h, "caption": "", "alt_captions": [], "error": ""})
    return to_table(rows)
