"""A synthetic, network-free img2dataset work folder of N rows: real parquet, real tars of small real JPEGs.

For the scale benchmark (bench/dataset_scale.py) and the tests of the ledger / incremental publish / gc:
the caption table is planned by the real `datasets.plan.plan`, then every group's img2dataset output is
written the way img2dataset writes it (`NNNNN.tar` with <key>.jpg/.txt/.json members, `NNNNN.parquet`
with its columns, `NNNNN_stats.json` last), with a fixed fraction of failed downloads. Images are a pool of
distinct small JPEGs (PIL-encoded noise), reused cyclically, so shards are real but the folder stays small.
"""
from __future__ import annotations

import io
import zlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from slip_core import storage

from datasets import plan, tarshards
from datasets.config import DatasetConfig

I2D_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("sample_id", pa.string()),
                        ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                        ("width", pa.int64()), ("height", pa.int64()),
                        ("original_width", pa.int64()), ("original_height", pa.int64())])


def jpeg_pool(n: int = 64, side: int = 16, seed: int = 0) -> list[bytes]:
    """`n` distinct small JPEGs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_table(path: str, n: int, start: int = 0, batch: int = 1 << 18) -> None:
    """Caption table of rows start..start+n: key (9-digit line number), url, caption (streamed)."""
    writer = None
    with storage.atomic_open(path, "wb") as f:
        for lo in range(start, start + n, batch):
            ids = np.arange(lo, min(lo + batch, start + n))
            keys = pa.array(np.char.zfill(ids.astype(str), 9))
            t = pa.table({"key": keys,
                          "url": pa.compute.binary_join_element_wise("http://127.0.0.1:9/img/", keys, ".jpg", ""),
                          "caption": pa.compute.binary_join_element_wise("a photo number ", keys, "")})
            writer = writer or pq.ParquetWriter(f, t.schema)
            writer.write_table(t)
        writer.close()


def fake_download(groups: list, fail_every: int = 10, pool: list[bytes] | None = None) -> int:
    """Write img2dataset's output for every shard of `groups` (every `fail_every`-th row failed); returns
    the number of successes."""
    pool = pool or jpeg_pool()
    ok = 0
    for g in groups:
        rows = pq.read_table(storage.join(g.path, "input.parquet"), columns=["url", "caption", "sample_id"])
        for s in range(g.n_shards):
            part = rows.slice(s * g.nps, g.nps)
            ok += _write_shard(storage.join(g.path, "out"), s, part, fail_every, pool)
    return ok


def _write_shard(out: str, shard: int, rows: pa.Table, fail_every: int, pool: list[bytes]) -> int:
    n = len(rows)
    ids = rows["sample_id"].to_pylist()
    i2d = [f"{shard:05d}{i:04d}" for i in range(n)]
    fail = [int(k) % fail_every == fail_every - 1 for k in ids]
    with storage.atomic_open(storage.join(out, f"{shard:05d}.tar"), "wb") as f:
        tw = tarshards.TarWriter(f)
        caps = rows["caption"].to_pylist()
        for j, (k, sid, bad) in enumerate(zip(i2d, ids, fail)):
            if bad:
                continue
            tw.add(f"{k}.jpg", pool[int(sid) % len(pool)])
            tw.add(f"{k}.txt", caps[j].encode())
            tw.add(f"{k}.json", json.dumps({"key": k, "sample_id": sid, "caption": caps[j]}).encode())
        tw.close()
    status = pa.array(["failed_to_download" if b else "success" for b in fail])
    size = pa.array([None if b else 16 for b in fail], pa.int64())
    t = pa.table({"url": rows["url"], "caption": rows["caption"], "sample_id": rows["sample_id"], "key": pa.array(i2d),
                  "status": status, "error_message": pa.array(["HTTP Error 404: Not Found" if b else None for b in fail]),
                  "width": size, "height": size, "original_width": size, "original_height": size}, schema=I2D_SCHEMA)
    with storage.atomic_open(storage.join(out, f"{shard:05d}.parquet"), "wb") as f:
        pq.write_table(t, f)
    storage.atomic_write_text(storage.join(out, f"{shard:05d}_stats.json"),
                              json.dumps({"count": n, "successes": n - sum(fail), "failed_to_download": sum(fail)}))
    return n - sum(fail)


def fake_fingerprints(groups: list, seed: int = 0, copy_every: int = 40) -> int:
    """Write the quality pass's per-shard fingerprint cache (quality/fingerprint.py: same file, schema and
    place the real hashing writes) for every shard of `groups`, with seeded random 256-bit pHashes and
    sha256s instead of hashes of the pool images (which would make every sample one of 64 exact copies).
    Every `copy_every`-th success is an exact copy of the one before it and the next one a near copy
    (6 bits flipped) of the one two before, so dedup has work. For the scale benchmark: hashing itself is
    measured by bench/hash_engines.py. Returns the number of fingerprint rows written."""
    from datasets.quality import fingerprint

    total = 0
    for g in groups:
        for s in range(g.n_shards):
            out = storage.join(g.path, "out")
            t = pq.read_table(storage.join(out, f"{s:05d}.parquet"), columns=["key", "status", "caption"])
            t = t.filter(pa.compute.equal(t["status"], "success"))
            n = len(t)
            rng = np.random.default_rng([seed, zlib.crc32(g.path.encode()), s])
            ph, sha = rng.integers(0, 256, (n, 32), dtype=np.uint8), rng.integers(0, 256, (n, 32), dtype=np.uint8)
            exact = np.arange(copy_every, n, copy_every)
            ph[exact], sha[exact] = ph[exact - 1], sha[exact - 1]
            near = exact[exact + 1 < n] + 1
            ph[near] = ph[near - 2]
            for _ in range(6):
                ph[near, rng.integers(0, 32, len(near))] ^= (1 << rng.integers(0, 8, len(near))).astype(np.uint8)
            side = pa.array(np.full(n, 256, np.int32))
            rows = pa.table({"key": t["key"], "sha256": fingerprint.phash_hex(_fixed(sha)), "orig_sha256": pa.array([""] * n),
                             "phash": _fixed(ph), "width": side, "height": side, "orig_width": side, "orig_height": side,
                             "caption": t["caption"], "alt_captions": pa.array([[]] * n, pa.list_(pa.string())),
                             "error": pa.array([""] * n)}, schema=fingerprint.FINGERPRINT_SCHEMA)
            with storage.atomic_open(fingerprint.cache_url(fingerprint.shard_url(g.path, s)), "wb") as f:
                pq.write_table(rows, f)
            total += n
    return total


def _fixed(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(a.shape[1]), len(a), [None, pa.py_buffer(a.tobytes())])


def build_work(table: str, work: str, cfg: DatasetConfig, fail_every: int = 10, fingerprints: bool = False) -> int:
    """Plan `table` into `work` with the real planner and write every group's img2dataset output (and,
    with `fingerprints`, their fingerprint caches: fake_fingerprints)."""
    groups = plan.plan(table, work, cfg)
    ok = fake_download(groups, fail_every)
    if fingerprints:
        fake_fingerprints(groups)
    return ok
