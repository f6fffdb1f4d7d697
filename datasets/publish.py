"""Publishing a dataset version: the ledger's successes repacked into contiguous, byte-deterministic shards
named by dataset key, then ledger.parquet / sizes.json / stats.json and the dataset manifest (last).
"""
from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import artifacts, storage
from slip_core.config import to_dict
from slip_core.failpoints import failpoint

from datasets import quality as quality_pass  # issue 10: dedup, decontamination, filters
from datasets import tarshards
from datasets.config import PARALLEL_FIELDS, DatasetConfig
from datasets.ledger import LEDGER_SCHEMA, final_ledger, ledger_fingerprint, status_summary


def iter_shard_samples(tar_url: str):
    """(i2d key, {ext: bytes}) from an img2dataset tar, in key order (img2dataset writes samples in
    completion order; sorting makes the published shards byte-identical across identical builds).
    One source shard is held in memory at a time (10k samples of 256 px JPEG: ~250 MB). img2dataset writes
    plain regular files only, so a truncated tar, a link or an unsafe member name means a damaged or
    tampered work dir: tarshards raises (BadTar / UnsafeMember) and nothing is published from it."""
    fs, p = storage.url_to_fs(tar_url)
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
            for k, sample in iter_shard_samples(storage.join(gpath, "out", f"{s:05d}.tar")):
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


def publish(table_path: str, work: str, cfg: DatasetConfig, store: str, upstream: dict | None = None,
            extra_stats: dict | None = None) -> str:
    """Repack, write ledger/sizes/stats and the dataset manifest (last). Returns the manifest URL; an
    identical earlier publication (same table, settings and ledger) is returned as is."""
    ledger = final_ledger(table_path, work)
    qual = quality_pass.run_quality(ledger, cfg.quality) if cfg.quality.enabled else None  # (ledger, fingerprints, report)
    if qual:
        ledger = qual[0]
    table_sha = storage.sha256_file(table_path)
    ident = {k: v for k, v in to_dict(cfg).items() if k not in PARALLEL_FIELDS}
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
    stats = {**status_summary(ledger), "shards": len(sizes), "num_samples": sum(sizes.values()),
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
