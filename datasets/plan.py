"""Planning a download: which rows go to img2dataset next, in which groups of shards.

`plan` returns the unfinished groups of earlier attempts (resume) plus, in a new attempt, the rows no
complete shard or pending attempt holds (failed rows too with `retry_failed`). A group's input.parquet is
frozen once written, so img2dataset's shard ids always map to the same rows.
"""
from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import storage

from datasets.config import DatasetConfig
from datasets.ledger import collect_ledger
from datasets.sources.captions import url_column
from datasets.table import filter_rows, read_table
from datasets.work import Group, group_complete, list_dirs, load_groups

RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}  # img2dataset main.py arguments_validator


def plan(table_path: str, work: str, cfg: DatasetConfig, retry_failed: bool = False) -> list[Group]:
    """Groups still to download: unfinished groups of earlier attempts (resume) plus, in a new attempt,
    rows no complete shard or pending attempt holds (failed rows too when `retry_failed`)."""
    pending: list[Group] = []
    claimed: set[str] = set()
    fs, attempts_path = storage.url_to_fs(storage.join(work, "attempts"))
    for name in list_dirs(storage.join(work, "attempts")):
        groups = load_groups(storage.join(work, "attempts", name))
        if groups is None:  # killed while planning: nothing was downloaded from it
            fs.rm(f"{attempts_path}/{name}", recursive=True)
            continue
        for g in groups:
            if not group_complete(g):
                pending.append(g)
                claimed.update(pq.read_table(storage.join(g.path, "input.parquet"), columns=["sample_id"])["sample_id"].to_pylist())
    ledger = collect_ledger(work)
    filt = filter_rows(read_table(table_path, ["key", "url"]))  # the full table is read only if there is work
    status = dict(zip(ledger["key"].to_pylist(), ledger["status"].to_pylist())) if len(ledger) else {}
    take = []
    for i, (k, reason) in enumerate(zip(filt["key"].to_pylist(), filt["reason"].to_pylist())):
        if reason or k in claimed:
            continue
        st = status.get(k)
        if st is None or (retry_failed and st.startswith("failed")):
            take.append(i)
    if take:
        table = read_table(table_path)
        pending.extend(_new_attempt(table.take(pa.array(take, pa.int64())), work, cfg, len(list_dirs(storage.join(work, "attempts")))))
    return pending


def _i2d_input(rows: pa.Table) -> pa.Table:
    """Rows as img2dataset input: url, caption, sample_id (our key; 'key' is reserved) + extra columns."""
    ucol = url_column(rows.column_names)
    cols = {"url": rows[ucol], "caption": rows["caption"] if "caption" in rows.column_names else pa.array([""] * len(rows)),
            "sample_id": rows["key"]}
    for c in rows.column_names:
        if c not in RESERVED and c not in (ucol, "key") and c not in cols:
            cols[c] = rows[c]
    return pa.table(cols)


def _new_attempt(rows: pa.Table, work: str, cfg: DatasetConfig, seq: int) -> list[Group]:
    rows = _i2d_input(rows)
    ident = hashlib.sha256("\n".join(rows["sample_id"].to_pylist()).encode()).hexdigest()[:12]
    name = f"{seq:04d}-{ident}"
    attempt = storage.join(work, "attempts", name)
    nps = cfg.number_sample_per_shard
    per_group = nps * cfg.shards_per_group
    groups, meta = [], []
    for gi, start in enumerate(range(0, len(rows), per_group)):
        part = rows.slice(start, per_group)
        gpath = storage.join(attempt, f"g{gi:05d}")
        with storage.atomic_open(storage.join(gpath, "input.parquet"), "wb") as f:
            pq.write_table(part, f)
        n_shards = math.ceil(len(part) / nps)
        groups.append(Group(name, gpath, len(part), n_shards, nps))
        meta.append({"name": f"g{gi:05d}", "n_rows": len(part), "n_shards": n_shards})
    storage.atomic_write_text(storage.join(attempt, "plan.json"),
                              json.dumps({"nps": nps, "rows": len(rows), "groups": meta}, indent=1))
    return groups
