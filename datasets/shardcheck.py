"""Content checks of one published webdataset shard, independent of the others (so they map on a cluster).

`artifacts.verify` proves the bytes are the ones published; this proves the shard is what sizes.json
says: a readable tar whose members group into `expected` samples, each with an image, a caption and
its metadata (contracts.md: <key>.jpg, <key>.txt, <key>.json).
"""
from __future__ import annotations

import collections
import json
import tarfile

from slip_core import storage

REQUIRED = ("jpg", "txt", "json")


def check_shard(root: str, rel: str, expected: int) -> list[str]:
    """Problems with shard `rel` under artifact `root` ([] = fine)."""
    url = storage.join(root, rel)
    fs, path = storage.url_to_fs(url)
    exts: dict[str, set[str]] = collections.defaultdict(set)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    key, _, ext = m.name.rpartition("/")[2].partition(".")
                    exts[key].add(ext)
                    if ext == "json":
                        json.loads(tf.extractfile(m).read())
    except (OSError, tarfile.TarError, ValueError) as e:
        return [f"unreadable shard: {rel}: {type(e).__name__}: {e}"]
    problems = [f"sample {key} of {rel} lacks {', '.join(x for x in REQUIRED if x not in have)}"
                for key, have in sorted(exts.items()) if not set(REQUIRED) <= have]
    if len(exts) != expected:
        problems.append(f"sample count mismatch: {rel} has {len(exts)}, sizes.json says {expected}")
    return problems
