"""Exact and near-duplicate collapse over image fingerprints, stable across dataset versions.

Rule (deterministic): samples are visited in a fixed order and each is compared with the samples KEPT so
far; a sample whose exact hash (`orig_sha256 or sha256`) equals a kept one's, or whose pHash is within
`hamming` bits of a kept one's, becomes `duplicate_of:<kept key>` (the nearest kept sample, ties -> the
smallest key); otherwise it is kept. The order is what makes rebuilds stable:

1. anchors: samples the previous version kept (status success there). They stay kept when they are still
   downloadable now, and they also count when their key is absent from the new ledger (an increment that
   only lists new rows), so new copies of them point at the previous version's key;
2. samples the previous version marked `duplicate_of:X` keep that decision while X is still an anchor;
3. everything else (new rows, and rows whose earlier decision no longer holds), by ascending key.

So a new near-copy never evicts an earlier kept sample, even when its key sorts first, and earlier
duplicate decisions do not move. Without `previous`, this is greedy "smallest key wins" clustering.

Near-neighbour search is datasets.quality.hamming_index (multi-index hashing in numpy: no Python object
per hash). Samples are decided in batches of BATCH in the order above: a batch is searched against the
index of the samples kept before it, and within itself (a small index of the batch); a sample with no
candidate inside its batch is decided at once, the rare ones with an earlier candidate in the same batch
in order, in Python, each against what is kept by then. Only kept samples enter the index, so a cluster
of a million copies costs a million queries, not a million squared pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.quality import fingerprint
from datasets.quality.hamming_index import HammingIndex, as_words

DUP_PREFIX = "duplicate_of:"
BATCH = 8192
KINDS = ("exact", "near", "previous")


@dataclass
class DedupResult:
    """`duplicates`: key, duplicate_of (the kept key), distance (Hamming; 0 exact, -1 decided by the previous
    version), kind ("exact" | "near" | "previous"), in decision order. `kept`: the kept keys of the input."""
    duplicates: pa.Table
    kept: pa.Array

    @property
    def duplicate_of(self) -> dict[str, str]:
        return dict(zip(self.duplicates["key"].to_pylist(), self.duplicates["duplicate_of"].to_pylist()))

    @property
    def distance(self) -> dict[str, int]:
        return dict(zip(self.duplicates["key"].to_pylist(), self.duplicates["distance"].to_pylist()))

    @property
    def kind(self) -> dict[str, str]:
        return dict(zip(self.duplicates["key"].to_pylist(), self.duplicates["kind"].to_pylist()))


def _exact_ids(t: pa.Table) -> pa.ChunkedArray:
    """`orig_sha256 or sha256` per row ('' where both are empty: no exact id). No copy when no row has an
    orig_sha256 (the dataset stage passes the exact id as sha256)."""
    orig, sha = t["orig_sha256"], t["sha256"]
    has_orig = pc.fill_null(pc.not_equal(orig, ""), False)
    eid = pc.if_else(has_orig, orig, sha) if pc.any(has_orig).as_py() else sha
    return pc.fill_null(eid, "") if eid.null_count else eid


def _exact_codes(*eids) -> tuple[np.ndarray, int]:
    """(int64 code per exact id, the pieces in order, -1 for ''; number of codes): equal ids, equal codes."""
    parts = [c for e in eids for c in (e.chunks if isinstance(e, pa.ChunkedArray) else [e])]
    ids = pa.chunked_array([c.cast(pa.string()) for c in parts], pa.string())
    has = pc.not_equal(ids, "")
    hexes = ids if pc.all(has).as_py() is not False else ids.filter(has)
    if pc.all(pc.match_substring_regex(hexes, "^[0-9a-f]{64}$")).as_py() is not False:
        return _sha_codes(hexes, has.to_numpy()), len(hexes)  # n_codes: an upper bound is enough
    uniq = pc.unique(ids)
    codes = pc.index_in(ids, value_set=uniq).to_numpy().astype(np.int64)
    none = pc.index_in(pa.array([""]), value_set=uniq)[0].as_py()
    if none is not None:
        codes[codes == none] = -1
    return codes, len(uniq)


def _sha_codes(hexes: pa.ChunkedArray, has: np.ndarray) -> np.ndarray:
    """_exact_codes for lowercase sha256 hex ids, in numpy on their 32 bytes: decoded in slices into one
    [n, 4] uint64 array, sorted, equal neighbours share a code (~64 bytes per id, against ~250 for a hash
    table of 64-character strings)."""
    words, pos = np.empty((len(hexes), 4), np.uint64), 0
    for chunk in hexes.chunks:
        for s in range(0, len(chunk), 1 << 18):
            part = fingerprint.as_bytes_matrix(fingerprint.phash_from_hex(chunk.slice(s, 1 << 18)))
            words[pos:pos + len(part)] = np.ascontiguousarray(part).view(np.uint64)
            pos += len(part)
    order = np.lexsort(words.T[::-1])
    new = np.zeros(len(order), bool)
    for j in range(4):
        col = words[order, j]
        new[1:] |= col[1:] != col[:-1]
    if len(new):
        new[0] = True
    inverse = np.empty(len(order), np.int64)
    inverse[order] = np.cumsum(new) - 1
    codes = np.full(len(has), -1, np.int64)
    codes[has] = inverse
    return codes


def _words_of(phash) -> tuple[np.ndarray, np.ndarray]:
    """(has a phash mask, [n_with, 4] uint64 hashes) of a phash column."""
    has = pc.is_valid(phash).to_numpy(zero_copy_only=False)
    return has, as_words(phash.filter(pa.array(has)))


def _previous(previous: pa.Table | None, cur_keys: pa.Array, ledger_keys) -> tuple[pa.Table, pa.Table]:
    """(anchors: key, exact id, phash, in current; earlier duplicates: key, target), both sorted by key."""
    empty = pa.table({"key": pa.array([], pa.string())})
    if previous is None or not len(previous):
        return empty, empty
    prev = fingerprint.last_per_key(previous)
    in_cur = pc.is_in(prev["key"], value_set=cur_keys)
    in_ledger = in_cur if ledger_keys is None else pc.is_in(prev["key"], value_set=ledger_keys)
    status = pc.fill_null(prev["status"], "")
    anchor = pc.and_(pc.equal(status, "success"), pc.or_(in_cur, pc.invert(in_ledger)))
    reason = pc.fill_null(prev["reason"], "")
    was_dup = pc.and_(pc.equal(status, "filtered"), pc.starts_with(reason, DUP_PREFIX))
    anchors = prev.filter(anchor)
    anchors = pa.table({"key": anchors["key"], "eid": _exact_ids(anchors), "phash": anchors["phash"],
                        "in_cur": pc.is_in(anchors["key"], value_set=cur_keys)})
    dups = prev.filter(was_dup)
    dups = pa.table({"key": dups["key"], "target": pc.utf8_slice_codeunits(dups["reason"], len(DUP_PREFIX))})
    return anchors, dups


def find_duplicates(fingerprints: pa.Table, hamming: int | None = 20, exact: bool = True,
                    previous: pa.Table | None = None, ledger_keys=None) -> DedupResult:
    """Duplicate decisions for the rows of `fingerprints` (key, sha256, orig_sha256, phash; all eligible).

    `previous`: the previous version's table with key, sha256, orig_sha256, phash, status, reason (see
    `previous_table`). `ledger_keys` (an array or set): every key of the current ledger (any status); a previous
    anchor whose key is in the ledger but not eligible now (failed, filtered) no longer anchors.
    `hamming=None` turns near-duplicate search off.
    """
    if isinstance(ledger_keys, (set, frozenset, list, tuple)):
        ledger_keys = pa.array(sorted(ledger_keys), pa.string())
    cur = fingerprint.last_per_key(fingerprints.select(["key", "sha256", "orig_sha256", "phash"]))
    cur_keys = cur["key"].combine_chunks().cast(pa.string())
    anchors, prev_dups = _previous(previous, cur_keys, ledger_keys)
    # every key that can be kept, in key order: its rank is the sample's id (ties -> the smallest key)
    all_keys = pc.unique(pa.chunked_array([cur_keys, anchors["key"].combine_chunks().cast(pa.string())])
                         if len(anchors) else cur_keys)
    all_keys = all_keys.take(pc.sort_indices(all_keys))
    rank_of = lambda keys: pc.index_in(keys, value_set=all_keys).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731

    # samples decided by the previous version: anchors are kept; their earlier duplicates stay duplicates
    is_anchor = pc.is_in(cur_keys, value_set=anchors["key"]) if len(anchors) else pa.array(np.zeros(len(cur_keys), bool))
    decided_dups = pa.table({"key": pa.array([], pa.string()), "target": pa.array([], pa.string())})
    if len(prev_dups):
        live = prev_dups.filter(pc.is_in(prev_dups["target"], value_set=anchors["key"]) if len(anchors)
                                else pa.array(np.zeros(len(prev_dups), bool)))
        decided_dups = live.filter(pc.and_(pc.is_in(live["key"], value_set=cur_keys),
                                           pc.invert(pc.is_in(live["key"], value_set=anchors["key"]))))
    undecided = pc.and_(pc.invert(is_anchor), pc.invert(pc.is_in(cur_keys, value_set=decided_dups["key"])))
    todo = cur if pc.all(undecided).as_py() is not False else cur.filter(undecided)  # no copy without a previous version
    del cur, is_anchor, undecided

    if exact:  # the codes are all that is kept of the exact ids
        codes, n_codes = _exact_codes(*([anchors["eid"]] if len(anchors) else []), _exact_ids(todo))
    else:
        codes, n_codes = np.full(len(anchors) + len(todo), -1, np.int64), 0
    state = _State(np.full(n_codes + 1, -1, np.int64),  # + 1: never empty (codes < 0 read slot 0, unused)
                   HammingIndex(hamming, capacity=len(anchors) + len(todo)) if hamming is not None else None)
    if len(anchors):
        state.register(rank_of(anchors["key"]), codes[:len(anchors)], *_words_of(anchors["phash"]))
    t_ranks = rank_of(todo["key"]) if len(todo) else np.zeros(0, np.int64)  # ascending: todo is sorted by key
    out = [_decide_batch(state, t_ranks[s:s + BATCH], codes[len(anchors) + s:len(anchors) + s + BATCH],
                         *_words_of(todo["phash"].slice(s, BATCH))) for s in range(0, len(todo), BATCH)]
    keep = np.concatenate([np.zeros(0, bool)] + [o[0] for o in out])
    dup_rank = np.concatenate([np.zeros(0, np.int64)] + [o[1] for o in out])
    dup_target = np.concatenate([np.zeros(0, np.int64)] + [o[2] for o in out])
    dup_dist = np.concatenate([np.zeros(0, np.int32)] + [o[3] for o in out])
    dup_kind = np.concatenate([np.zeros(0, np.int8)] + [o[4] for o in out])
    n_prev = len(decided_dups)
    duplicates = pa.table({
        "key": pa.concat_arrays([decided_dups["key"].combine_chunks().cast(pa.string()),
                                 all_keys.take(pa.array(dup_rank))]),
        "duplicate_of": pa.concat_arrays([decided_dups["target"].combine_chunks().cast(pa.string()),
                                          all_keys.take(pa.array(dup_target))]),
        "distance": pa.array(np.r_[np.full(n_prev, -1, np.int32), dup_dist], pa.int32()),
        "kind": pa.array(np.r_[np.full(n_prev, "previous", object), np.array(KINDS, object)[dup_kind]], pa.string())})
    kept = pa.concat_arrays([anchors.filter(anchors["in_cur"])["key"].combine_chunks().cast(pa.string())
                             if len(anchors) else pa.array([], pa.string()), all_keys.take(pa.array(t_ranks[keep]))])
    return DedupResult(duplicates, kept)


@dataclass
class _State:
    """What the samples kept so far give the next batch: the first kept rank per exact id, the kept pHashes."""
    first_kept: np.ndarray  # exact-id code -> rank of the first kept sample with it (-1: none)
    index: HammingIndex | None

    def register(self, ranks: np.ndarray, codes: np.ndarray, has_ph: np.ndarray, words: np.ndarray) -> None:
        """Kept samples, in decision order (arrays of equal length; `words` for the has_ph ones)."""
        ok = codes >= 0
        u, first = np.unique(codes[ok], return_index=True)
        fresh = self.first_kept[u] < 0
        self.first_kept[u[fresh]] = ranks[ok][first[fresh]]
        if self.index is not None:
            self.index.add(words, ranks[has_ph])


def _decide_batch(state: _State, ranks: np.ndarray, codes: np.ndarray, has_ph: np.ndarray, words: np.ndarray):
    """Decisions for one batch in order -> (kept mask, duplicate ranks, their targets, distances, kind codes)."""
    n = len(ranks)
    ex = np.where(codes >= 0, state.first_kept[np.maximum(codes, 0)], -1)  # exact copy of a sample kept before
    near, near_d = np.full(n, -1, np.int64), np.full(n, -1, np.int32)
    intra_q = intra_i = intra_d = np.zeros(0, np.int64)
    if state.index is not None and has_ph.any():
        near[has_ph], near_d[has_ph] = state.index.nearest(words)
        local = np.flatnonzero(has_ph)
        batch_index = HammingIndex(state.index.threshold, capacity=len(local), buckets_per_item=16)  # small: sparse
        batch_index.add(words, local)
        q, i, d = batch_index.search(words)
        q = local[q]
        earlier = i < q
        intra_q, intra_i, intra_d = q[earlier], i[earlier], d[earlier]
    # an earlier sample of the batch with the same exact id
    order = np.lexsort((np.arange(n), codes))
    same_code = np.zeros(n, bool)
    sc = codes[order]
    same_code[order[1:]] = (sc[1:] == sc[:-1]) & (sc[1:] >= 0)
    slow = (ex < 0) & (same_code | np.isin(np.arange(n), intra_q))
    target = np.where(ex >= 0, ex, near)
    dist = np.where(ex >= 0, 0, near_d)
    kind = np.where(ex >= 0, 0, 1).astype(np.int8)
    keep = (target < 0) & ~slow
    if slow.any():
        _decide_in_order(np.flatnonzero(slow), ranks, codes, keep, target, dist, kind, (intra_q, intra_i, intra_d))
    dup = ~keep
    state.register(ranks[keep], codes[keep], has_ph[keep], words[keep[has_ph]])
    return keep, ranks[dup], target[dup], dist[dup].astype(np.int32), kind[dup]


def _decide_in_order(slow: np.ndarray, ranks, codes, keep, target, dist, kind, intra) -> None:
    """The samples of a batch with an earlier candidate in the same batch, one by one in order (in place)."""
    q, i, d = intra
    by_q = np.argsort(q, kind="stable")
    q, i, d = q[by_q], i[by_q], d[by_q]
    lo, hi = np.searchsorted(q, slow, "left"), np.searchsorted(q, slow, "right")
    members: dict[int, list[int]] = {}
    for j in np.flatnonzero(codes >= 0):
        members.setdefault(int(codes[j]), []).append(int(j))
    for j, a, b in zip(slow.tolist(), lo.tolist(), hi.tolist()):
        same = [m for m in members.get(int(codes[j]), ()) if m < j and keep[m]] if codes[j] >= 0 else []
        if same:
            target[j], dist[j], kind[j] = ranks[same[0]], 0, 0
            continue
        hits = [(int(d[x]), int(ranks[i[x]])) for x in range(a, b) if keep[i[x]]]
        if target[j] >= 0:
            hits.append((int(dist[j]), int(target[j])))
        if hits:
            dist[j], target[j] = min(hits)
            kind[j] = 1
        else:
            keep[j] = True


def previous_table(ledger: pa.Table, fingerprints: pa.Table | None = None) -> pa.Table:
    """A published version's ledger (key, status, reason) joined with its fingerprints (given, or the
    ledger's own fingerprint columns, fingerprint.attach_to_ledger): what `find_duplicates(previous=...)`
    and `apply_quality(previous=...)` take for the next version."""
    fp = fingerprint.from_ledger(ledger) if fingerprints is None else fingerprints
    fp = fp.select(["key", "sha256", "orig_sha256", "phash"])
    return ledger.select(["key", "status", "reason"]).join(fp, "key", join_type="inner")
