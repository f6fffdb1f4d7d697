"""`slip bench [NAME ...]`: run the benchmarks in bench/ (each prints one JSON line)."""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def available() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(BENCH_DIR, "*.py")))


def _run(args) -> int:
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {available()}")
    rc = 0
    for name in names:
        proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), *args.extra],
                              timeout=args.timeout)
        rc = rc or proc.returncode
    return rc


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="run benchmarks (one JSON line each)")
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all in {BENCH_DIR})")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to each script")
    p.set_defaults(func=_run)

