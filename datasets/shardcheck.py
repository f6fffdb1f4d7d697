"""Content checks of one published webdataset shard, independent of the others (so they map on a cluster).

`artifacts.verify` proves the bytes are the ones published; this proves the shard is what sizes.json
says: a readable tar, to its end-of-archive block, whose members group into `expected` samples, each with
an image, a caption and its metadata (contracts.md: <key>.jpg, <key>.txt, <key>.json), and no member a
reader would refuse (a link or device, a name that is absolute, has '..' or a control character; see
slip_core.tarsamples, which the training loader reads shards with).
"""
from __future__ import annotations

import collections
import json

from slip_core import artifacts, storage, tarsamples

REQUIRED = ("jpg", "txt", "json")


def check_shard(root: str, rel: str, expected: int) -> list[str]:
    """Problems with shard `rel` under artifact `root` ([] = fine)."""
    url = artifacts.resolve(root, rel)  # an incremental version's earlier shards are `../<artifact>/...`
    fs, path = storage.url_to_fs(url)
    exts: dict[str, set[str]] = collections.defaultdict(set)
    unsafe: list[str] = []
    try:
        with fs.open(path, "rb") as f:
            for sample in tarsamples.iter_samples(f, rel):
                if "__unsafe__" in sample:
                    unsafe.append(sample["__unsafe__"])
                    continue
                key = sample["__key__"].rpartition("/")[2]
                exts[key].update(k for k in sample if not k.startswith("__"))
                if "json" in sample:
                    json.loads(sample["json"])
    except (OSError, tarsamples.BadShard, ValueError) as e:
        return [f"unreadable shard: {rel}: {type(e).__name__}: {e}"]
    problems = [f"unsafe member in {rel}: {u}" for u in unsafe]
    problems += [f"sample {key} of {rel} lacks {', '.join(x for x in REQUIRED if x not in have)}"
                 for key, have in sorted(exts.items()) if not set(REQUIRED) <= have]
    if len(exts) != expected:
        problems.append(f"sample count mismatch: {rel} has {len(exts)}, sizes.json says {expected}")
    return problems
