"""The ledger: every input row's one recorded fate, derived from the work folder (datasets/work.py).

`final_ledger` rebuilds the fate of every input row from the completed img2dataset shards of all
attempts (later attempts override earlier ones: that is how --retry-failed merges) and refuses to go on
while any row has none. Columns: LEDGER_SCHEMA; `source` names the img2dataset sample of a success
('<group path>|<shard id>|<img2dataset key>').
"""
from __future__ import annotations

import collections
import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import storage

from datasets.table import filter_rows, read_table
from datasets.work import all_attempts, done_shards

STATUSES = ("success", "failed_to_download", "failed_to_resize", "filtered")

LEDGER_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                           ("error", pa.string()),
                           ("attempt", pa.string()), ("source", pa.string()), ("shard", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32())])


def normalize_reason(error: str) -> str:
    """A short, aggregatable reason from img2dataset's error string (the raw one is kept in `error`)."""
    if "!buf.empty()" in error:
        return "empty response (0 bytes)"
    if "infinite loop" in error:
        return "redirect loop"
    first = error.strip().splitlines()[0] if error.strip() else error
    return first[:200]


def collect_ledger(work: str) -> pa.Table:
    """Fate of every row some complete shard holds: key, status, reason, attempt, source (group/shard:i2d key),
    width, height. Later attempts override earlier ones (that is how retry-failed merges)."""
    rows: dict[str, tuple] = {}
    for attempt, groups in all_attempts(work):
        for g in groups:
            done = done_shards(g)
            if not done:
                continue
            ids = pq.read_table(storage.join(g.path, "input.parquet"), columns=["sample_id"])["sample_id"].to_pylist()
            for s in sorted(done):
                t = pq.read_table(storage.join(g.path, "out", f"{s:05d}.parquet"),
                                  columns=["sample_id", "key", "status", "error_message", "width", "height"]).to_pydict()
                seen = set()
                for sid, k, st, err, w, h in zip(t["sample_id"], t["key"], t["status"], t["error_message"], t["width"], t["height"]):
                    seen.add(sid)
                    err = "" if st == "success" else (err or st)
                    rows[sid] = (st, normalize_reason(err), err, attempt, f"{g.path}|{s}|{k}", w, h)
                for sid in ids[s * g.nps:(s + 1) * g.nps]:
                    if sid not in seen:  # img2dataset caught an exception and wrote no record
                        rows[sid] = ("failed_to_download", "no record in img2dataset output", "", attempt, "", None, None)
    keys = list(rows)
    names = ("status", "reason", "error", "attempt", "source", "width", "height")
    cols = list(zip(*rows.values())) if rows else [[]] * len(names)
    return pa.table({"key": pa.array(keys, pa.string()),
                     **{n: pa.array(c, LEDGER_SCHEMA.field(n).type) for n, c in zip(names, cols)}})


def final_ledger(table_path: str, work: str) -> pa.Table:
    """One row per input row with exactly one status; raises if a row has none yet (run download first)."""
    filt = filter_rows(read_table(table_path, ["key", "url"]))
    got = collect_ledger(work)
    idx = {k: i for i, k in enumerate(got["key"].to_pylist())}
    g = got.to_pydict()
    out = {n: [] for n in LEDGER_SCHEMA.names}
    missing = []
    for k, u, reason in zip(filt["key"].to_pylist(), filt["url"].to_pylist(), filt["reason"].to_pylist()):
        i = None if reason else idx.get(k)
        if reason:
            vals = ("filtered", reason, "", "", "", None, None)
        elif i is None:
            missing.append(k)
            continue
        else:
            vals = tuple(g[n][i] for n in ("status", "reason", "error", "attempt", "source", "width", "height"))
        out["key"].append(k)
        out["url"].append(u)
        for n, v in zip(("status", "reason", "error", "attempt", "source", "width", "height"), vals):
            out[n].append(v)
        out["shard"].append("")
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no status yet (first: {missing[:5]}); the download is "
                           "incomplete - rerun to resume")
    return pa.table(out, schema=LEDGER_SCHEMA)


def status_summary(ledger: pa.Table) -> dict:
    st = collections.Counter(ledger["status"].to_pylist())
    reasons = collections.Counter((s, "duplicate_of:*" if r.startswith("duplicate_of:") else r)  # one per kept key otherwise
                                  for s, r in zip(ledger["status"].to_pylist(), ledger["reason"].to_pylist()) if s != "success")
    return {"rows": len(ledger), "by_status": {k: st.get(k, 0) for k in STATUSES},
            "success_rate": round(st.get("success", 0) / max(1, len(ledger)), 4),
            "reasons": [{"status": s, "reason": r, "count": c} for (s, r), c in reasons.most_common(50)]}


def ledger_fingerprint(ledger: pa.Table) -> str:
    """sha256 over every row's (key, status, reason, source): identifies what a publication would contain."""
    fp = hashlib.sha256()
    for row in zip(*(ledger[c].to_pylist() for c in ("key", "status", "reason", "source"))):
        fp.update("\x1f".join(map(str, row)).encode() + b"\n")
    return fp.hexdigest()
