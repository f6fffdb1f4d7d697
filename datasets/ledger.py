"""The ledger and the published dataset: every input row's one recorded fate, then the artifact.

`final_ledger` rebuilds the fate of every input row from the completed img2dataset shards of all
attempts (later attempts override earlier ones: that is how --retry-failed merges) and refuses to go on
while any row has none. `publish` repacks the successes into contiguous, byte-deterministic shards named
by dataset key, writes ledger.parquet / sizes.json / stats.json and the dataset manifest last.
"""
from __future__ import annotations

import collections
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import artifacts, storage
from slip_core.config import to_dict
from slip_core.failpoints import failpoint

from datasets import quality as quality_pass  # issue 10: dedup, decontamination, filters
from datasets import tarshards
from datasets.download import (_PARALLEL_FIELDS, STATUSES, DatasetConfig, _fs, all_attempts, done_shards,
                               filter_rows, read_table)

# -------------------------------------------------------------------------------------------- ledger

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


# ------------------------------------------------------------------------------------------- publish

def _iter_samples(tar_url: str):
    """(i2d key, {ext: bytes}) from an img2dataset tar, in key order (img2dataset writes samples in
    completion order; sorting makes the published shards byte-identical across identical builds).
    One source shard is held in memory at a time (10k samples of 256 px JPEG: ~250 MB). img2dataset writes
    plain regular files only, so a truncated tar, a link or an unsafe member name means a damaged or
    tampered work dir: tarshards raises (BadTar / UnsafeMember) and nothing is published from it."""
    fs, p = _fs(tar_url)
    by_key: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with fs.open(p, "rb", block_size=1 << 22) as f:
        for name, data in tarshards.iter_members(f):
            parsed = tarshards.split_name(name)
            if parsed is not None:
                by_key[parsed[0]][parsed[1]] = data
    for key in sorted(by_key):
        yield key, by_key[key]


def repack(ledger: pa.Table, root: str, samples_per_shard: int) -> tuple[pa.Table, dict[str, int]]:
    """Copy each success (from the shard the ledger names) into root/shards/NNNNN.tar under its dataset key.
    Returns the ledger with `shard` filled in and sizes {shard path: n}."""
    d = ledger.to_pydict()
    where: dict[tuple[str, int], dict[str, int]] = collections.defaultdict(dict)  # (group, shard) -> i2d key -> row
    for i, (st, src) in enumerate(zip(d["status"], d["source"])):
        if st == "success":
            gpath, s, k = src.split("|")
            where[(gpath, int(s))][k] = i
    sizes: dict[str, int] = {}
    out: dict = {"cm": None, "tw": None, "name": None}

    def close():
        if out["tw"] is not None:
            out["tw"].close()
            out["cm"].__exit__(None, None, None)
            failpoint("publish.shard_closed")  # crash tests (slip_core/failpoints.py)
            out["tw"] = None

    n_out = 0
    try:
        for (gpath, s) in sorted(where):
            wanted = where[(gpath, s)]
            for k, sample in _iter_samples(storage.join(gpath, "out", f"{s:05d}.tar")):
                i = wanted.pop(k, None)
                if i is None:
                    continue
                if n_out % samples_per_shard == 0:
                    close()
                    out["name"] = f"shards/{n_out // samples_per_shard:05d}.tar"
                    out["cm"] = storage.atomic_open(storage.join(root, out["name"]), "wb")
                    out["tw"] = tarshards.TarWriter(out["cm"].__enter__())
                    sizes[out["name"]] = 0
                key = d["key"][i]
                if "json" in sample:
                    meta = json.loads(sample["json"])
                    meta["i2d_key"], meta["key"] = meta.get("key"), key
                    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
                for ext in sorted(sample):
                    out["tw"].add(f"{key}.{ext}", sample[ext])
                d["shard"][i] = out["name"]
                sizes[out["name"]] += 1
                n_out += 1
                failpoint("publish.sample_written")
            if wanted:
                raise RuntimeError(f"{len(wanted)} successes listed for {gpath} shard {s} are not in its tar")
    except BaseException as e:
        if out["tw"] is not None:  # drop the partial shard (atomic_open removes its temp file)
            out["cm"].__exit__(type(e), e, e.__traceback__)
        raise
    close()
    return pa.table(d, schema=LEDGER_SCHEMA), sizes


def _status_summary(ledger: pa.Table) -> dict:
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


def publish(table_path: str, work: str, cfg: DatasetConfig, store: str, upstream: dict | None = None,
            extra_stats: dict | None = None) -> str:
    """Repack, write ledger/sizes/stats and the dataset manifest (last). Returns the manifest URL; an
    identical earlier publication (same table, settings and ledger) is returned as is."""
    ledger = final_ledger(table_path, work)
    qual = quality_pass.run_quality(ledger, cfg.quality) if cfg.quality.enabled else None  # (ledger, fingerprints, report)
    if qual:
        ledger = qual[0]
    table_sha = storage.sha256_file(table_path)
    ident = {k: v for k, v in to_dict(cfg).items() if k not in _PARALLEL_FIELDS}
    root = artifacts.stage_root(store, "dataset", cfg.name, table_sha, ident, ledger_fingerprint(ledger))
    murl = artifacts.manifest_url(root)
    if artifacts.is_complete(murl):  # published before and intact
        return murl
    storage.remove_temp_files(root)  # partial shards of a publish killed mid-write (callers hold the work lock)
    ledger, sizes = repack(ledger, root, cfg.number_sample_per_shard)
    if qual:  # fingerprint columns in the ledger + quality.json
        ledger = quality_pass.publish_outputs(ledger, qual, root)
    with storage.atomic_open(storage.join(root, "ledger.parquet"), "wb") as f:
        pq.write_table(ledger, f)
    storage.atomic_write_text(storage.join(root, "sizes.json"), json.dumps(sizes, indent=1, sort_keys=True))
    stats = {**_status_summary(ledger), "shards": len(sizes), "num_samples": sum(sizes.values()),
             "attempts": sorted(set(a for a in ledger["attempt"].to_pylist() if a)), "input_table_sha256": table_sha,
             "work_dir": work, **(extra_stats or {})}  # no timings: same inputs -> byte-identical artifact
    if qual:
        stats["quality"] = quality_pass.summary(qual[2])
    storage.atomic_write_text(storage.join(root, "stats.json"), json.dumps(stats, indent=1, sort_keys=True, default=str))
    files = sorted(sizes) + ["ledger.parquet", "sizes.json", "stats.json"] + ([quality_pass.REPORT_FILE] if qual else [])
    m = artifacts.build_manifest(root, files, kind="dataset", name=cfg.name, config=to_dict(cfg), upstream=upstream or {},
                                 metrics={"num_samples": stats["num_samples"], "num_rows": stats["rows"],
                                          "success_rate": stats["success_rate"], "shards": len(sizes),
                                          "input_table_sha256": table_sha, "shard_samples": sizes,
                                          **{f"n_{k}": v for k, v in stats["by_status"].items()}})
    failpoint("publish.before_manifest")
    return artifacts.publish(m, root)
