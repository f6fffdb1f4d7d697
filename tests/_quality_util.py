"""Helpers for the dataset-quality tests: real images as img2dataset-style shards + a matching ledger.

The shards are written like img2dataset's webdataset output (`<key>.jpg`, `<key>.txt`, `<key>.json` with
its metadata row) and the ledger has datasets/ledger.py's columns, with `source` naming
'<group path>|<shard id>|<img2dataset key>' — so the tests exercise the same path the dataset stage uses.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
from PIL import Image

LEDGER_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                           ("attempt", pa.string()), ("source", pa.string()), ("shard", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32())])


def encode(img: Image.Image | np.ndarray, quality: int = 95, size: tuple[int, int] | None = None,
           fmt: str = "JPEG") -> bytes:
    """Re-encode an image (optionally resized first) the way a web copy would be."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if size is not None and size != img.size:
        img = img.resize(size, Image.LANCZOS if size[0] > img.size[0] else Image.BICUBIC)
    buf = io.BytesIO()
    img = img.convert("RGB") if fmt == "JPEG" else img
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def short_side(img: Image.Image, side: int) -> tuple[int, int]:
    w, h = img.size
    s = side / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_group(gpath: str, samples: list[dict], per_shard: int = 50) -> list[dict]:
    """Write samples {key, image (bytes), caption, orig_size?} as img2dataset shards under gpath/out/.
    Returns ledger rows (success) whose `source` points at them."""
    os.makedirs(os.path.join(gpath, "out"), exist_ok=True)
    rows = []
    for s0 in range(0, len(samples), per_shard):
        sid = s0 // per_shard
        with tarfile.open(os.path.join(gpath, "out", f"{sid:05d}.tar"), "w") as tf:
            for j, s in enumerate(samples[s0:s0 + per_shard]):
                i2d = f"{sid:05d}{j:04d}"
                try:
                    w, h = Image.open(io.BytesIO(s["image"])).size
                except Exception:  # a planted corrupt file: img2dataset would not have written it, but shards
                    w, h = 0, 0  # are untrusted input all the same
                ow, oh = s.get("orig_size", (w, h))
                meta = {"key": i2d, "caption": s["caption"], "sample_id": s["key"], "status": "success",
                        "width": w, "height": h, "original_width": ow, "original_height": oh,
                        "sha256": s.get("orig_sha256", hashlib.sha256(s["image"]).hexdigest()), **s.get("meta", {})}
                _add(tf, f"{i2d}.jpg", s["image"])
                _add(tf, f"{i2d}.txt", s["caption"].encode())
                _add(tf, f"{i2d}.json", json.dumps(meta).encode())
                rows.append({"key": s["key"], "url": f"http://127.0.0.1/{s['key']}.jpg", "status": "success", "reason": "",
                             "attempt": "0000-test", "source": f"{gpath}|{sid}|{i2d}", "shard": "", "width": w, "height": h})
    return rows


def failed_rows(keys: list[str]) -> list[dict]:
    return [{"key": k, "url": f"http://127.0.0.1/{k}", "status": "failed_to_download", "reason": "HTTP Error 404",
             "attempt": "0000-test", "source": "", "shard": "", "width": None, "height": None} for k in keys]


def ledger(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


def assert_one_status(before: pa.Table, after: pa.Table) -> None:
    """apply_quality's contract: same rows in the same order; only success -> filtered(+reason) changes."""
    assert after.schema == before.schema
    assert after["key"].to_pylist() == before["key"].to_pylist()
    for b, a in zip(before.to_pylist(), after.to_pylist()):
        assert a["status"] in ("success", "failed_to_download", "failed_to_resize", "filtered")
        if b["status"] != "success" or a["status"] == "success":
            assert a == b
        else:
            assert a["status"] == "filtered" and a["reason"]
            assert {k: v for k, v in a.items() if k not in ("status", "reason")} == \
                   {k: v for k, v in b.items() if k not in ("status", "reason")}
