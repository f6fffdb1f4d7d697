"""Benchmark: the near-duplicate / decontamination index (datasets.quality.hamming_index) at >= 1M hashes.

Data: N random 256-bit hashes, plus planted copies of some of them at known Hamming distances 0..T+8
(threshold T = 20, the quality pass's default). Measured, one process, same run:

* index: build time, memory per item (the index's arrays, and the process RSS growth while building), and
  queries/s of `nearest` on Q hashes (half planted copies, half fresh random ones); every planted copy within T
  must come back with its source and exact distance, and nothing else may match;
* dedup: `find_duplicates` (the quality pass's rule: batched, index of kept samples) over the N hashes + the
  planted copies as one fingerprint table: rows/s, and every planted copy within T must be a duplicate;
* baseline: the previous implementation (pure-Python multi-index hashing, kept below verbatim as it was at
  commit 3e0d8db) on N_OLD hashes, and ours on the same N_OLD hashes: queries/s and memory per item (tracemalloc).

Prints one JSON line; `ratio` = our queries/s over the old one's at N_OLD. Sizes: BENCH_INDEX_ROWS (1000000),
BENCH_INDEX_QUERIES (100000), BENCH_INDEX_OLD_ROWS (100000).
"""
from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc
from itertools import combinations

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.quality import dedup  # noqa: E402
from datasets.quality.hamming_index import HammingIndex, as_words  # noqa: E402

N = int(os.environ.get("BENCH_INDEX_ROWS", 1_000_000))
Q = int(os.environ.get("BENCH_INDEX_QUERIES", 100_000))
N_OLD = int(os.environ.get("BENCH_INDEX_OLD_ROWS", 100_000))
T = 20


class OldHammingIndex:
    """The previous implementation (datasets/quality/dedup.py at 3e0d8db), the baseline."""

    def __init__(self, threshold: int, bits: int = 256, blocks: int | None = None):
        self.threshold, self.bits = threshold, bits
        m = blocks or min(threshold // 2 + 1, bits)
        self.radius = threshold // m
        base, extra = divmod(bits, m)
        self.blocks: list[tuple[int, int]] = []
        shift = 0
        for i in range(m):
            w = base + (1 if i < extra else 0)
            self.blocks.append((shift, w))
            shift += w
        self._masks = {w: [0] + [sum(1 << b for b in c) for r in range(1, self.radius + 1) for c in combinations(range(w), r)]
                       for _, w in self.blocks}
        self._tables: list[dict[int, list[int]]] = [{} for _ in self.blocks]
        self._order = np.concatenate([np.arange(i, bits, m) for i in range(m)]) if bits % 8 == 0 else None
        self.values: list[int] = []
        self.items: list = []

    def _permute(self, h: int) -> int:
        b = np.unpackbits(np.frombuffer(h.to_bytes(self.bits // 8, "big"), np.uint8))
        return int.from_bytes(np.packbits(b[self._order]).tobytes(), "big")

    def _parts(self, h: int):
        for (shift, w), table in zip(self.blocks, self._tables):
            yield (h >> shift) & ((1 << w) - 1), w, table

    def add(self, h: int, item) -> None:
        h = self._permute(h)
        idx = len(self.values)
        self.values.append(h)
        self.items.append(item)
        for v, _, table in self._parts(h):
            table.setdefault(v, []).append(idx)

    def query(self, h: int) -> list[tuple[int, object]]:
        h = self._permute(h)
        seen: set[int] = set()
        out = []
        for v, w, table in self._parts(h):
            for mask in self._masks[w]:
                for idx in table.get(v ^ mask, ()):
                    if idx in seen:
                        continue
                    seen.add(idx)
                    d = (self.values[idx] ^ h).bit_count()
                    if d <= self.threshold:
                        out.append((d, self.items[idx]))
        return out


def planted(rng, base: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(copies [n, 32] uint8, source rows, distances 0..T+8) of random rows of `base`."""
    src = rng.integers(0, len(base), n)
    dist = rng.integers(0, T + 9, n)
    bits = np.unpackbits(base[src], axis=1)
    flip = np.argsort(rng.random((n, 256)), axis=1)
    mask = np.arange(256)[None, :] < dist[:, None]
    rows = np.repeat(np.arange(n), 256)[mask.ravel()]
    bits[rows, flip[mask]] ^= 1
    return np.packbits(bits, axis=1), src, dist


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ours(base: np.ndarray, queries: np.ndarray) -> dict:
    words = as_words(base)
    r0 = rss_bytes()
    t0 = time.perf_counter()
    index = HammingIndex(T, capacity=len(base))
    index.add(words)
    build = time.perf_counter() - t0
    grown = rss_bytes() - r0
    qw = as_words(queries)
    t0 = time.perf_counter()
    near, dist = index.nearest(qw)
    tq = time.perf_counter() - t0
    return {"build_s": round(build, 2), "queries_per_s": round(len(queries) / tq), "bytes_per_item": round(index.nbytes / len(base), 1),
            "rss_growth_bytes_per_item": round(grown / len(base), 1), "near": near, "dist": dist}


def old(base: np.ndarray, queries: np.ndarray) -> dict:
    ints = [int.from_bytes(bytes(r), "big") for r in base]
    tracemalloc.start()
    t0 = time.perf_counter()
    index = OldHammingIndex(T)
    for i, h in enumerate(ints):
        index.add(h, i)
    build = time.perf_counter() - t0
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    q = [int.from_bytes(bytes(r), "big") for r in queries]
    t0 = time.perf_counter()
    for h in q:
        index.query(h)
    tq = time.perf_counter() - t0
    return {"build_s": round(build, 2), "queries_per_s": round(len(q) / tq), "bytes_per_item": round(mem / len(base), 1)}


def ours_small(base: np.ndarray, queries: np.ndarray) -> dict:
    tracemalloc.start()
    index = HammingIndex(T, capacity=len(base))
    index.add(as_words(base))
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    qw = as_words(queries)
    t0 = time.perf_counter()
    index.nearest(qw)
    return {"queries_per_s": round(len(queries) / (time.perf_counter() - t0)), "bytes_per_item": round(mem / len(base), 1)}


def dedup_rows(base: np.ndarray, copies: np.ndarray, dist: np.ndarray) -> dict:
    import pyarrow as pa

    h = np.concatenate([base, copies])
    n = len(h)
    keys = pa.array(np.char.zfill(np.arange(n).astype(str), 9))  # copies sort after their sources
    table = pa.table({"key": keys, "sha256": pa.array([""] * n), "orig_sha256": pa.array([""] * n),
                      "phash": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(h.tobytes())])})
    t0 = time.perf_counter()
    res = dedup.find_duplicates(table, hamming=T, exact=False)
    t = time.perf_counter() - t0
    dup_keys = set(res.duplicates["key"].to_pylist())
    want = {f"{len(base) + i:09d}" for i in np.flatnonzero(dist <= T)}
    assert want <= dup_keys, len(want - dup_keys)
    return {"rows": n, "rows_per_s": round(n / t), "seconds": round(t, 2), "duplicates": len(res.duplicates)}


def main() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (N, 32), dtype=np.uint8)
    copies, src, dist = planted(rng, base, Q // 2)
    queries = np.concatenate([copies, rng.integers(0, 256, (Q - Q // 2, 32), dtype=np.uint8)])
    big = ours(base, queries)
    within = dist <= T
    assert np.array_equal(big["near"][:len(copies)][within], src[within]), "a planted copy was missed"
    assert np.array_equal(big["dist"][:len(copies)][within], dist[within])
    assert (big["near"][:len(copies)][~within] < 0).all() and (big["near"][len(copies):] < 0).all(), "false match"
    dd = dedup_rows(base, copies, dist)
    small_base, small_q = base[:N_OLD], np.concatenate([copies[src < N_OLD][:5000], queries[len(copies):][:5000]])
    was = old(small_base, small_q)
    now = ours_small(small_base, small_q)
    print(json.dumps({
        "name": "dedup_index", "value": big["queries_per_s"], "unit": "queries/s", "rows": N, "queries": Q, "threshold": T,
        "baseline": was["queries_per_s"], "ratio": round(now["queries_per_s"] / was["queries_per_s"], 2),
        "baseline_desc": f"previous pure-Python multi-index hashing at {N_OLD} hashes vs ours at the same size",
        "index": {k: v for k, v in big.items() if k not in ("near", "dist")},
        f"at_{N_OLD}": {"ours": now, "old": was, "memory_ratio": round(was["bytes_per_item"] / now["bytes_per_item"], 1)},
        "dedup": dd, "planted_within_threshold": int(within.sum()), "load_avg": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
