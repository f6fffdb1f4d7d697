"""Exact Hamming radius search over 256-bit perceptual hashes, batched in numpy, in bounded memory.

Pigeonhole (multi-index hashing, Norouzi, Punjani & Fleet, CVPR 2012): the bits are dealt into
m = T // 2 + 1 blocks, so two hashes within T bits differ in at most r = T // m <= 1 bits on some block.
Blocks take interleaved bits (bit j -> block j % m): pHash bits of one DCT row are correlated, and
correlated blocks make crowded buckets.

Each block is a chained hash table over the first `b` bits of its block (b ~ log2 of the capacity, so
there are about as many buckets as items): `head[bucket]` is the last position inserted there, `next[pos]`
the previous one in the same bucket; both int32 arrays, no Python object per item. A query probes, per
block, its own bucket and (r = 1) the b buckets one bit away, walks the chains and verifies every candidate
with a popcount of the full 256 bits. The block bits beyond `b` only make a bucket coarser (more candidates
to verify), never lose a match: a block within r bits is within r bits on its first b bits too.

Memory per item: 32 bytes of hash, 8 of id, 4 per block of chain link, and the bucket heads (4 bytes per
bucket per block, about one bucket per item): ~130 bytes at T = 20 (bench/dedup_index.py measures it).
Queries run in chunks, each chunk's candidates are verified before the next is generated.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

HASH_BITS = 256
HASH_BYTES = HASH_BITS // 8
MAX_BUCKET_BITS = 26  # 64M buckets per block at most
QUERY_CHUNK = 4096


def as_words(hashes) -> np.ndarray:
    """[n, 4] uint64 (C-contiguous) from [n, 32] uint8, a list of 32-byte strings, or a pyarrow
    fixed_size_binary(32) / binary array without nulls."""
    if isinstance(hashes, (pa.Array, pa.ChunkedArray)):
        arr = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
        if arr.null_count:
            raise ValueError("hashes must not be null")
        if not len(arr):
            return np.zeros((0, 4), np.uint64)
        if not pa.types.is_fixed_size_binary(arr.type):
            arr = arr.cast(pa.binary(HASH_BYTES))
        buf = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * HASH_BYTES:(arr.offset + len(arr)) * HASH_BYTES]
        return np.ascontiguousarray(buf.reshape(-1, HASH_BYTES)).view(np.uint64)
    if isinstance(hashes, np.ndarray):
        a = hashes
    else:
        a = np.frombuffer(b"".join(hashes), np.uint8)
        if a.size != HASH_BYTES * len(hashes):
            raise ValueError(f"hashes must be {HASH_BYTES} bytes each")
    return np.ascontiguousarray(a.reshape(-1, HASH_BYTES).astype(np.uint8, copy=False)).view(np.uint64)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distances between two [n, 4] uint64 arrays."""
    return np.bitwise_count(a ^ b).sum(axis=1, dtype=np.int32)


class HammingIndex:
    """Insert-only index of 256-bit hashes with integer ids; exact search for all hashes within `threshold`."""

    def __init__(self, threshold: int, capacity: int = 1024, buckets_per_item: int = 1):
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.threshold = threshold
        self.n_blocks = m = min(threshold // 2 + 1, HASH_BITS)
        self.radius = threshold // m
        assert self.radius <= 1 and m * (self.radius + 1) > threshold
        # at least `buckets_per_item` buckets per item: fewer = more candidates to verify, more = more memory
        want = math.ceil(math.log2(max(capacity * buckets_per_item, 2)))
        b = self.bucket_bits = min(HASH_BITS // m, MAX_BUCKET_BITS, max(4, want))
        # bucket of block k = sum of 2**t over its first b bits j = k + m * t that are set, as a byte lookup:
        # _lut[i, v] = the bucket contributions (all blocks) of byte i having value v
        weights = np.zeros((HASH_BITS, m), np.int64)
        for k in range(m):
            for t, j in enumerate(range(k, HASH_BITS, m)[:b]):
                weights[j, k] = 1 << t
        byte_bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int64)  # MSB first
        lut = np.stack([byte_bits @ weights[8 * i:8 * i + 8] for i in range(HASH_BYTES)])  # [32, 256, m]
        self._lut = [(i, np.ascontiguousarray(lut[i, :, k]).astype(np.int32)) for k in range(m)
                     for i in range(HASH_BYTES) if lut[i, :, k].any()]
        self._lut_block = [k for k in range(m) for i in range(HASH_BYTES) if lut[i, :, k].any()]
        self._flips = np.r_[0, (1 << np.arange(b)) if self.radius else []].astype(np.int32)
        # chains, all blocks in one flat array each: head[k << b | bucket], next[k * cap + pos] (flat indices)
        self._head = np.full(m << b, -1, np.int32)
        self._cap = max(capacity, 16)
        if m * self._cap >= 2**31:
            raise ValueError(f"HammingIndex: capacity {capacity} at threshold {threshold} exceeds the int32 chain links")
        self._next = np.empty(m * self._cap, np.int32)
        self._words = np.empty((4, self._cap), np.uint64)  # column-major: word 0 rejects most candidates alone
        self._ids = np.empty(self._cap, np.int32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._head.nbytes + self._next.nbytes + self._words.nbytes + self._ids.nbytes

    def _buckets(self, words: np.ndarray) -> np.ndarray:
        """[n_blocks, n] int64: each hash's bucket in each block."""
        by = np.ascontiguousarray(words.view(np.uint8).T)  # [32, n]
        out = np.zeros((self.n_blocks, len(words)), np.int32)
        for k, (i, table) in zip(self._lut_block, self._lut):
            out[k] += table[by[i]]
        return out.astype(np.int64)

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, 2 * self._cap)
        old, m = self._cap, self.n_blocks
        if m * cap >= 2**31:
            raise ValueError(f"HammingIndex: {need} hashes at threshold {self.threshold} exceed the int32 chain links")
        live = self._head >= 0  # flat next indices k * old + pos -> k * cap + pos
        self._head[live] += (self._head[live] // old) * (cap - old)
        nxt = np.full(m * cap, -1, np.int32)
        for k in range(m):
            row = self._next[k * old:k * old + self._n]
            nxt[k * cap:k * cap + self._n] = np.where(row >= 0, row + (row // old) * (cap - old), -1)
        self._next, self._cap = nxt, cap
        words = np.empty((4, cap), np.uint64)
        words[:, :self._n] = self._words[:, :self._n]
        self._words = words
        self._ids = np.concatenate([self._ids[:self._n], np.empty(cap - self._n, np.int32)])

    def add(self, words: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Insert hashes ([n, 4] uint64, see as_words) with their ids (default: insertion positions)."""
        n = len(words)
        if not n:
            return
        self._grow(self._n + n)
        pos = np.arange(self._n, self._n + n, dtype=np.int64)
        buckets = self._buckets(words)
        for k in range(self.n_blocks):
            order = np.argsort(buckets[k])
            sb = buckets[k, order] + (k << self.bucket_bits)
            sp = pos[order] + k * self._cap
            same = np.r_[False, sb[1:] == sb[:-1]]
            self._next[sp] = np.where(same, np.r_[-1, sp[:-1]], self._head[sb])
            last = np.r_[~same[1:], True]
            self._head[sb[last]] = sp[last]
        self._words[:, pos] = words.T
        self._ids[pos] = pos if ids is None else ids
        self._n += n

    def _candidates(self, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, position) of every hash sharing a probed bucket with a query (with repeats)."""
        m, nq, nf = self.n_blocks, buckets.shape[1], len(self._flips)
        probes = (buckets[:, :, None] ^ self._flips) + (np.arange(m, dtype=np.int64) << self.bucket_bits)[:, None, None]
        cur = self._head[probes.ravel()]
        q = np.broadcast_to(np.repeat(np.arange(nq), nf), (m, nq * nf)).ravel()
        live = cur >= 0
        qq, cur = q[live], cur[live]
        rows, found = [], []
        while len(cur):
            rows.append(qq)
            found.append(cur)
            cur = self._next[cur]
            live = cur >= 0
            qq, cur = qq[live], cur[live]
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(found) % self._cap

    def search(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, id, distance) of every indexed hash within `threshold` of each query, each pair once,
        sorted by query row then id."""
        out_q, out_id, out_d = [], [], []
        for s in range(0, len(words) if self._n else 0, QUERY_CHUNK):
            chunk = words[s:s + QUERY_CHUNK]
            q, pos = self._candidates(self._buckets(chunk))
            cols = np.ascontiguousarray(chunk.T)
            d = np.zeros(len(q), np.int32)
            for w in range(4):  # word by word: a candidate out of range after any word is dropped
                d += np.bitwise_count(cols[w][q] ^ self._words[w][pos])
                ok = d <= self.threshold
                q, pos, d = q[ok], pos[ok], d[ok]
            pair, first = np.unique(q * self._n + pos, return_index=True)
            out_q.append(pair // self._n + s)
            out_id.append(self._ids[pair % self._n])
            out_d.append(d[first])
        if not out_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
        q, ids, d = np.concatenate(out_q), np.concatenate(out_id), np.concatenate(out_d)
        order = np.lexsort((ids, q))
        return q[order], ids[order], d[order]

    def nearest(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id, distance) per query of the nearest indexed hash within `threshold` (ties: the smallest id);
        id -1 (distance -1) where there is none."""
        ids = np.full(len(words), -1, np.int64)
        dist = np.full(len(words), -1, np.int32)
        q, i, d = self.search(words)
        if len(q):
            order = np.lexsort((i, d, q))
            q, i, d = q[order], i[order], d[order]
            first = np.r_[True, q[1:] != q[:-1]]
            ids[q[first]], dist[q[first]] = i[first], d[first]
        return ids, dist
