"""Fully cached `slip reproduce --preset tiny`: wall time against a running `slip server start` server,
against Prefect's ephemeral server (the baseline, measured in the same run). Issue 16's bound: <= 5 s.

    python bench/noop_reproduce.py [--store STORE] [--runs 3] [--full]

Builds the tiny pipeline once into a temporary store (at test size unless --full: the real tiny preset,
several minutes on 2 cores), or reuses --store if it was built with the same arguments; then times the real
CLI (a subprocess per run, imports included) with no server running, and `--runs` times against
`slip server start --store`. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SLIP = os.path.join(os.path.dirname(sys.executable), "slip")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "train.max_steps=12", "--set", "train.log_every=2", "--set", "train.ckpt_every=6",
         "--set", "train.num_workers=0", "--set", 'eval.zeroshot=["fashion_mnist"]',
         "--set", 'eval.linear=["fashion_mnist"]', "--set", "eval.retrieval=[]", "--set", "eval.max_samples=300",
         "--set", "eval.max_train_samples=600", "--set", "corpus.n_fashion=240"]


def _run(argv: list[str], env: dict, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([SLIP, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"slip {' '.join(argv[:3])} failed:\n{out.stderr[-3000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="an already built store (default: build one in a temp dir)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="the real tiny preset (no test-size --set overrides)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="slip-bench-noop-")
    store = a.store or os.path.join(tmp, "store")
    sets = [] if a.full else SMALL
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=os.path.join(tmp, "prefect-home"), PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        build_s = _run(["reproduce", "--preset", "tiny", "--store", store, *sets], env)
        _run(["server", "stop", "--store", store], env)  # a --store given by the caller may have one running
        ephemeral_s = _run(["reproduce", "--preset", "tiny", "--store", store, *sets], env)
        t0 = time.perf_counter()
        _run(["server", "start", "--store", store, "--port", "0"], env)
        server_start_s = time.perf_counter() - t0
        try:
            _run(["reproduce", "--preset", "tiny", "--store", store, *sets], env)  # the server's first run: warm-up
            runs = [_run(["reproduce", "--preset", "tiny", "--store", store, *sets], env) for _ in range(a.runs)]
        finally:
            _run(["server", "stop", "--store", store], env)
    finally:
        if not a.store:
            shutil.rmtree(tmp, ignore_errors=True)
    noop = statistics.median(runs)
    print(json.dumps({"bench": "noop_reproduce", "noop_s": round(noop, 2), "ephemeral_s": round(ephemeral_s, 2),
                      "speedup": round(ephemeral_s / noop, 2), "target_s": 5.0, "within_target": noop <= 5.0,
                      "runs_s": [round(r, 2) for r in runs], "server_start_s": round(server_start_s, 2),
                      "build_s": round(build_s, 1), "preset": "tiny" if a.full else "tiny (test size)",
                      "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
