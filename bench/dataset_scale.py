"""Benchmark: the dataset stage's ledger + quality pass + publish at scale, on a synthetic img2dataset work folder.

For each size N (default 1M and 4M rows; BENCH_SCALE_ROWS="1000000,4000000"): a caption table of N rows is
planned by the real planner and its img2dataset output written (datasets/synthetic.py: real parquet, real
tars of small real JPEGs, 10% failed downloads, no network; not timed), with the quality pass's per-shard
fingerprint caches (synthetic.fake_fingerprints: seeded random pHashes with planted exact and near copies;
the hashing itself is bench/hash_engines.py's). Quality preset BENCH_QUALITY (default "default": exact +
near dedup, decontamination against every local eval set, boilerplate captions). Then, in a fresh process each:

* quality: the ledger and the quality pass alone (publish.apply_quality: rule rows streamed shard by shard,
  eval overlap, dedup, decisions written back), its seconds and peak RSS;
* publish: the ledger (DuckDB join of the table and the per-shard parquet), the quality pass, repack,
  ledger.parquet, manifest; its wall time and peak RSS (ru_maxrss of that process);
* increment (at the smallest N): 1% new rows planned, "downloaded" and published as the next version; the
  bytes it writes (its own files) against the bytes of the full version.

Prints one JSON line: rows_per_s (largest N), peak_rss_mb per N, rss_bytes_per_row (slope between the two
largest sizes), the 15M-row peak extrapolated from it, and the increment's bytes written.
"""
from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = [int(x) for x in os.environ.get("BENCH_SCALE_ROWS", "1000000,4000000").split(",")]
NPS, SPG = 10_000, 64  # the yfcc15m preset's shard size and group size


QUALITY = os.environ.get("BENCH_QUALITY", "default")  # the quality preset the stage runs with ("off" = none)


def _cfg():
    from datasets.config import make_config

    return make_config({"name": "bench", "number_sample_per_shard": NPS, "shards_per_group": SPG, "quality": QUALITY},
                       "yfcc15m")


def child(mode: str, table: str, work: str, store: str) -> None:
    """One measured step in this (fresh) process; prints a JSON line."""
    from datasets import engine, ledger, plan, publish, synthetic
    from slip_core import artifacts

    t0 = time.perf_counter()
    cfg = _cfg()
    if mode == "prepare":  # + the fingerprint caches (synthetic.fake_fingerprints) and the eval sets' hashes
        synthetic.build_work(table, work, cfg, fingerprints=True)
        if cfg.quality.decontaminate:
            from datasets.quality import decontaminate

            decontaminate.load_eval_index(cfg.quality.decontaminate, cfg.quality.decontam_hamming)
        out = {}
    elif mode == "quality":  # the ledger and the quality pass alone (no repack)
        with engine.connect() as con:
            ledger.build_ledger(con, table, work)
            t1 = time.perf_counter()
            report = publish.apply_quality(con, cfg)
        out = {"quality_seconds": round(time.perf_counter() - t1, 2), "success_in": report["success_in"],
               "filtered": report["filtered"], "by_reason": report["by_reason"]}
    elif mode == "publish":
        murl = publish.publish(table, work, cfg, store)
        m = artifacts.load_manifest(murl)
        out = {"manifest": murl, "own_bytes": sum(f.size for f in m.files if not f.path.startswith("../")),
               "samples": m.metrics["num_samples"]}
    elif mode == "increment":  # table = the grown table; plan + download its new rows, then publish
        groups = plan.plan(table, work, cfg)
        synthetic.fake_download(groups)
        synthetic.fake_fingerprints(groups)
        t0 = time.perf_counter()
        murl = publish.publish(table, work, cfg, store)
        m = artifacts.load_manifest(murl)
        out = {"manifest": murl, "own_bytes": sum(f.size for f in m.files if not f.path.startswith("../")),
               "own_shard_bytes": sum(f.size for f in m.files if f.path.startswith("shards/")),
               "referenced_bytes": sum(f.size for f in m.files if f.path.startswith("../"))}
    out.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(out))


def _run(mode: str, table: str, work: str, store: str) -> dict:
    """One step in a fresh process; if DuckDB runs out of its budget, once more with a larger one (reported)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                                        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    from datasets import engine

    for memory in (engine.MEMORY_LIMIT, "1GB"):
        env["SLIP_DUCKDB_MEMORY"] = memory
        r = subprocess.run([sys.executable, __file__, "--child", mode, table, work, store], capture_output=True,
                           text=True, env=env)
        if r.returncode == 0:
            return {**json.loads(r.stdout.strip().splitlines()[-1]), "duckdb_memory": memory}
        if "Out of Memory" not in r.stderr:
            break
        print(f"{mode}: DuckDB out of memory at {memory}: {r.stderr.strip().splitlines()[-8][:200]}", file=sys.stderr)
    raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")


def _slopes(results: dict) -> dict:
    """seconds / peak RSS per size of one step, its rows/s at the largest size and the RSS slope."""
    big, small = max(results), sorted(results)[-2] if len(results) > 1 else min(results)
    slope = ((results[big]["peak_rss_mb"] - results[small]["peak_rss_mb"]) * 2**20 / (big - small)) if big > small else None
    return {"seconds": {n: r["quality_seconds"] for n, r in results.items()},
            "rows_per_s": round(big / results[big]["quality_seconds"]),
            "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in results.items()},
            "rss_bytes_per_row": round(slope, 1) if slope is not None else None,
            "peak_rss_mb_15m_extrapolated": round(results[big]["peak_rss_mb"] + slope * (15_000_000 - big) / 2**20, 1)
            if slope is not None else None,
            "filtered": {n: r["filtered"] for n, r in results.items()},
            "by_reason": results[big]["by_reason"]}


def grow(table: str, out: str, n_new: int) -> None:
    import pyarrow.parquet as pq

    from datasets import synthetic

    n = pq.ParquetFile(table).metadata.num_rows
    extra = out + ".extra.parquet"
    synthetic.write_table(extra, n_new, start=n)
    with pq.ParquetWriter(out, pq.read_schema(table)) as w:
        for path in (table, extra):
            for batch in pq.ParquetFile(path).iter_batches(1 << 18):
                w.write_batch(batch)
    os.unlink(extra)


def main() -> None:
    from datasets import synthetic

    results, quality = {}, {}
    incr = None
    for n in SIZES:
        keep = os.environ.get("BENCH_KEEP")  # a folder: prepared work folders are kept there and reused
        d = os.path.join(keep, f"rows-{n}") if keep else tempfile.mkdtemp(prefix=f"bench-scale-{n}-", dir=os.environ.get("BENCH_TMP"))
        try:
            table, store = os.path.join(d, "table.parquet"), os.path.join(d, "store")
            work = os.path.join(store, "dataset-work", "bench")
            if not os.path.exists(os.path.join(d, "prepared")):
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                synthetic.write_table(table, n)
                _run("prepare", table, work, store)
                open(os.path.join(d, "prepared"), "w").close()
            shutil.rmtree(os.path.join(store, "dataset"), ignore_errors=True)  # published versions: redone
            for extra in glob.glob(os.path.join(work, "attempts", "0001-*")) + glob.glob(os.path.join(work, "versions.json")):
                shutil.rmtree(extra) if os.path.isdir(extra) else os.unlink(extra)  # the increment: redone
            quality[n] = _run("quality", table, work, store) if _cfg().quality.enabled else None
            results[n] = _run("publish", table, work, store)
            if n == min(SIZES):
                grown = os.path.join(d, "table2.parquet")
                grow(table, grown, n // 100)
                incr = _run("increment", grown, work, store)
                incr["full_version_bytes"] = results[n]["own_bytes"]
        finally:
            if not keep:
                shutil.rmtree(d, ignore_errors=True)
    big, small = max(SIZES), sorted(SIZES)[-2] if len(SIZES) > 1 else min(SIZES)
    slope = ((results[big]["peak_rss_mb"] - results[small]["peak_rss_mb"]) * 2**20 / (big - small)) if big > small else None
    print(json.dumps({
        "name": "dataset_scale", "rows": SIZES, "rows_per_s": round(big / results[big]["seconds"]),
        "publish_seconds": {n: r["seconds"] for n, r in results.items()},
        "duckdb_memory": {n: r["duckdb_memory"] for n, r in results.items()},
        "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in results.items()},
        "rss_bytes_per_row": round(slope, 1) if slope is not None else None,
        "peak_rss_mb_15m_extrapolated": round(results[big]["peak_rss_mb"] + slope * (15_000_000 - big) / 2**20, 1)
        if slope is not None else None,
        "goal": {"rss_bytes_per_row": 64, "peak_rss_mb_15m": 2048},
        "quality_preset": QUALITY,
        "quality_pass": _slopes(quality) if all(quality.values()) else None,
        "increment": {"new_rows": min(SIZES) // 100, "bytes_written": incr["own_bytes"],
                      "shard_bytes_written": incr["own_shard_bytes"], "full_version_bytes": incr["full_version_bytes"],
                      "fraction": round(incr["own_bytes"] / incr["full_version_bytes"], 4),
                      "seconds": incr["seconds"]} if incr else None,
        "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
