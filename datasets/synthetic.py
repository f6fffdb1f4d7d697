"""A synthetic, network-free img2dataset work folder of N rows: real parquet, real tars of small real JPEGs.

For the scale benchmark (bench/dataset_scale.py) and the tests of the ledger / incremental publish / gc:
the caption table is planned by the real `datasets.plan.plan`, then every group's img2dataset output is
written the way img2dataset writes it (`NNNNN.tar` with <key>.jpg/.txt/.json members, `NNNNN.parquet`
with its columns, `NNNNN_stats.json` last), with a fixed fraction of failed downloads. Images are a pool of
distinct small JPEGs (PIL-encoded noise), reused cyclically, so shards are real but the folder stays small.
"""
from __future__ import annotations

import io
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


def build_work(table: str, work: str, cfg: DatasetConfig, fail_every: int = 10) -> int:
    """Plan `table` into `work` with the real planner and write every group's img2dataset output."""
    return fake_download(plan.plan(table, work, cfg), fail_every)
