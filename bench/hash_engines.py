"""Benchmark: the quality pass's per-shard hashing (fingerprint.map_shards) on each hash engine, 2 workers.

Corpus: bench/fingerprint.py's shards (the offline photos at a 256 px short side, JPEG q95, PER_SHARD per
tar). Engines: `processes` (a fork pool of WORKERS), `dask` (a real distributed.LocalCluster of WORKERS
worker processes; cluster start-up reported apart; a second, warm call after the workers imported our
modules) and `spark` (local[WORKERS]; the first call includes
building the session, the second reuses it). Caches off, so every call hashes every shard.

Value: images/s of the local process pool. Baseline in the same run: the serial pass (one process). Also
reported: images/s of each engine and its ratio to the serial pass. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKERS = int(os.environ.get("BENCH_WORKERS", 2))


def _rate(tars: list[str], n_images: int, **kw) -> float:
    from datasets.quality import fingerprint

    t0 = time.perf_counter()
    n = sum(len(t) for t in fingerprint.map_shards(tars, cache=False, **kw))
    assert n == n_images, n
    return n_images / (time.perf_counter() - t0)


def main() -> None:
    os.environ.setdefault("BENCH_FINGERPRINT_IMAGES", "800")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bench import fingerprint as bench_fp

    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tars = bench_fp.make_shards(d)
        n = bench_fp.N_IMAGES
        out["serial"] = _rate(tars, n, workers=1)
        out["processes"] = _rate(tars, n, workers=WORKERS, engine="processes")
        from distributed import LocalCluster

        t0 = time.perf_counter()
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as c:
            out["dask_cluster_start_s"] = time.perf_counter() - t0
            out["dask"] = _rate(tars, n, engine=c.scheduler_address)
            out["dask_warm"] = _rate(tars, n, engine=c.scheduler_address)  # workers have imported our modules
        if shutil.which("java"):
            from datasets import img2dataset_spark

            t0 = time.perf_counter()
            env = {**os.environ, "SLIP_SPARK_MASTER": f"local[{WORKERS}]"}
            spark = img2dataset_spark.session([], environ=env, app_name="bench-hash-engines")
            out["spark_session_start_s"] = time.perf_counter() - t0
            try:
                out["spark"] = _rate(tars, n, engine="spark")
                out["spark_warm"] = _rate(tars, n, engine="spark")
            finally:
                spark.stop()
    rates = {k: round(v, 1) for k, v in out.items() if not k.endswith("_s")}
    print(json.dumps({"name": "hash_engines", "value": rates["processes"], "baseline": rates["serial"],
                      "ratio": round(rates["processes"] / rates["serial"], 3), "unit": "images/s", "images": n,
                      "workers": WORKERS, "baseline_desc": "serial map_shards (one process)",
                      **{f"{k}_images_per_s": v for k, v in rates.items()},
                      **{f"{k}_ratio": round(v / rates["serial"], 3) for k, v in rates.items() if k != "serial"},
                      **{k: round(v, 2) for k, v in out.items() if k.endswith("_s")}}))


if __name__ == "__main__":
    main()
