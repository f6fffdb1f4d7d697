"""`slip dataset gc --store S [--delete]`: shards that no published dataset version references.

Incremental versions reference the shards of earlier versions (datasets/publish.py), so a shard can only be
removed when no manifest in the store lists it. Candidates are `shards/*.tar` files under
`<store>/dataset/*/` that no `manifest.json` there lists (own or `../<artifact>/...` entries); a folder
without a manifest is a publish that never finished (or one still running: files younger than `min_age_s`
are never candidates, so a gc next to a running build does not delete its fresh shards).
"""
from __future__ import annotations

import os
import time

from slip_core import artifacts, storage
from slip_core.store import Store

SHARD_GLOB = "shards/*.tar"


def _norm(url: str) -> str:
    return os.path.normpath(artifacts.local_path(url)) if storage.is_local(url) else str(url).rstrip("/")


def referenced_shards(store: str) -> set[str]:
    """Normalised URLs of every shard some published dataset manifest in the store lists."""
    refs: set[str] = set()
    for url, m in Store(store).published("dataset"):  # readable manifests only
        root = artifacts.artifact_root(url)
        refs.update(_norm(artifacts.resolve(root, f.path)) for f in m.files if f.path.endswith(".tar"))
    return refs


def _as_url(store: str, path: str) -> str:
    """An fsspec glob result (protocol stripped) back as a URL of the store's filesystem."""
    if storage.is_local(store):
        return path
    proto = str(store).split("://", 1)[0]
    return f"{proto}://{path}"


def collect(store: str, delete: bool = False, min_age_s: float = 3600.0) -> dict:
    """{'referenced': n, 'unreferenced': [urls], 'bytes': total size of those}; deletes them when `delete`."""
    refs = referenced_shards(store)
    fs, base = storage.url_to_fs(storage.join(store, "dataset"))
    found = fs.glob(base.rstrip("/") + "/*/" + SHARD_GLOB) if fs.exists(base) else []
    now, out, total = time.time(), [], 0
    for p in sorted(found):
        url = _as_url(store, p)
        if _norm(url) in refs:
            continue
        info = fs.info(p)
        mtime = info.get("mtime") or (info.get("LastModified").timestamp() if info.get("LastModified") else now)
        if now - float(mtime) < min_age_s:
            continue
        out.append(url)
        total += int(info.get("size") or 0)
    if delete:
        for url in out:
            fs.rm(storage.url_to_fs(url)[1])
    return {"referenced": len(refs), "unreferenced": out, "bytes": total, "deleted": delete}
