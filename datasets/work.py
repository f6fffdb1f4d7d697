"""The work folder of a download: what has been planned, handed to img2dataset and completed.

State lives in a work folder per (dataset name, download settings): `<store>/dataset-work/<name>-<hash>/`.

    attempts/0000-<id>/plan.json            written LAST when an attempt is planned (its marker)
    attempts/0000-<id>/g00000/input.parquet  the rows this group hands to img2dataset
    attempts/0000-<id>/g00000/out/           img2dataset's output: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json
    attempts/0000-<id>/g00000/run.json       pid/pgid of the img2dataset process working on it

Why this layout survives kill-and-rerun: img2dataset writes `NNNNN_stats.json` after the shard's tar and
parquet are closed (ENVIRONMENT.md 2.2), so a shard without it is treated as never attempted: its rows
get no status, its partial files are deleted, and img2dataset's own incremental mode (which skips shard
ids that have a `*.json`) redoes exactly those shards of the same, frozen group input (datasets/download.py).
The ledger is never stored as mutable state: it is derived from the completed shards of all attempts,
later attempts overriding earlier ones (retry-failed), so there is nothing to get out of sync
(datasets/ledger.py). A row is put into a new attempt only if no complete shard and no pending attempt
holds it (datasets/plan.py), hence no row is downloaded twice and none is lost.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

from slip_core import locks, storage
from slip_core.config import to_dict
from slip_core.store import Store

from datasets.config import PARALLEL_FIELDS, PLANNING_FIELDS, DatasetConfig


def work_dir(store: str, cfg: DatasetConfig) -> str:
    """Work folder identity = the settings that change what a download produces. Not the code: downloaded
    shards stay valid across code edits (a code change republishes from them; it never re-downloads)."""
    ident = {k: v for k, v in to_dict(cfg).items() if k not in PARALLEL_FIELDS | PLANNING_FIELDS | {"quality"}}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return Store(store).work_dir("dataset", f"{cfg.name}-{h}")


@contextlib.contextmanager
def work_lock(work: str):
    """Exclusive lease on a work folder for the whole build (slip_core/locks.py: a flock locally, a lease
    object with a conditional put on s3://, so builds on different hosts exclude each other too): a second
    build of the same dataset (a scheduled rebuild overlapping a manual one) fails fast, naming the holder,
    instead of killing the first one's img2dataset as 'stale' or planning the same rows twice."""
    stack = contextlib.ExitStack()
    try:
        held = stack.enter_context(locks.writer_lease(work, wait_s=0, purpose="dataset build"))
    except locks.LockBusy as e:
        raise RuntimeError(f"another dataset build ({locks.describe(e.holder)}) holds {work}; "
                           "wait for it or stop it") from None
    with stack:
        yield held


@dataclass
class Group:
    attempt: str  # attempt folder name, e.g. "0001-3fa2..."
    path: str  # group folder URL
    n_rows: int
    n_shards: int
    nps: int  # img2dataset number_sample_per_shard used for this group


def list_dirs(url: str) -> list[str]:
    fs, p = storage.url_to_fs(url)
    if not fs.exists(p):
        return []
    return sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False) if fs.isdir(x))


def load_groups(attempt_url: str) -> list[Group] | None:
    """Groups of a planned attempt, or None if the attempt was never finished planning."""
    plan_url = storage.join(attempt_url, "plan.json")
    if not storage.exists(plan_url):
        return None
    plan = json.loads(storage.read_text(plan_url))
    name = attempt_url.rstrip("/").rsplit("/", 1)[-1]
    return [Group(name, storage.join(attempt_url, g["name"]), g["n_rows"], g["n_shards"], plan["nps"]) for g in plan["groups"]]


def done_shards(group: Group) -> set[int]:
    fs, p = storage.url_to_fs(storage.join(group.path, "out"))
    if not fs.exists(p):
        return set()
    return {int(os.path.basename(x).split("_")[0]) for x in fs.glob(p.rstrip("/") + "/*_stats.json")}


def group_complete(group: Group) -> bool:
    return done_shards(group) >= set(range(group.n_shards))


def all_attempts(work: str) -> list[tuple[str, list[Group]]]:
    out = []
    for name in list_dirs(storage.join(work, "attempts")):
        groups = load_groups(storage.join(work, "attempts", name))
        if groups is not None:
            out.append((name, groups))
    return out
