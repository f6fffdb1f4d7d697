"""Dedup on real images in img2dataset-style shards: exact and near copies collapse to the smallest key,
distinct images survive, and an incremental rebuild keeps earlier decisions."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from datasets import offline
from datasets.quality import dedup, fingerprint, hamming_index
from datasets.quality import QualityConfig, apply_quality, apply_quality_report
from tests._quality_util import assert_one_status, encode, failed_rows, ledger, short_side, write_group

CFG = QualityConfig(exact_dedup=True, near_dup_hamming=20)


def test_hamming_index_equals_brute_force():
    """Random 256-bit hashes plus copies at 0..29 flipped bits, every threshold shape (one block, r = 0 and 1),
    inserted in several batches past the initial capacity: search / nearest equal the all-pairs popcount."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (600, 32), dtype=np.uint8)
    bits = np.unpackbits(base[:300], axis=1)
    for row in bits:
        row[rng.choice(256, rng.integers(0, 30), replace=False)] ^= 1
    values = np.concatenate([base, np.packbits(bits, axis=1)])  # 900 hashes
    words = hamming_index.as_words(values)
    indexed, queries = words[:700], words[600:]
    brute = np.bitwise_count(queries[:, None, :] ^ indexed[None, :, :]).sum(-1)
    for t in (0, 1, 3, 8, 20, 25):
        index = hamming_index.HammingIndex(t, capacity=64)
        for s in range(0, 700, 250):
            index.add(indexed[s:s + 250], np.arange(s, min(s + 250, 700)) + 1000)
        q, ids, d = index.search(queries)
        wq, wi = np.nonzero(brute <= t)
        assert np.array_equal(q, wq) and np.array_equal(ids, wi + 1000) and np.array_equal(d, brute[wq, wi]), t
        near, dist = index.nearest(queries)
        masked = np.where(brute <= t, brute * 10000 + np.arange(700), 1 << 40)  # nearest, then smallest id
        best = masked.min(1)
        assert np.array_equal(near, np.where(best < 1 << 40, best % 10000 + 1000, -1)), t
        assert np.array_equal(dist, np.where(best < 1 << 40, best // 10000, -1)), t
        assert index.radius <= 1 and index.n_blocks * (index.radius + 1) > t
    assert hamming_index.as_words([bytes(values[0])]).tobytes() == values[0].tobytes()
    assert hamming_index.as_words(pa.array([bytes(v) for v in values[:5]], pa.binary(32))).tobytes() == values[:5].tobytes()


def test_dedup_decisions_equal_the_sequential_rule():
    """find_duplicates (batched, index of kept samples) against the rule written as a plain loop over all kept
    samples: random hashes with planted near copies, exact-id collisions and dense clusters, crossing batches."""
    rng = np.random.default_rng(5)
    n = 3000
    h = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    src = rng.integers(0, n, n // 2)
    for j, s in zip(rng.choice(n, n // 2, replace=False), src):  # near copies at 0..25 bits
        b = np.unpackbits(h[s])
        b[rng.choice(256, rng.integers(0, 26), replace=False)] ^= 1
        h[j] = np.packbits(b)
    h[:200] = h[0]  # a dense cluster
    keys = [f"k{i:05d}" for i in rng.permutation(n)]
    sha = [f"s{rng.integers(0, 2500)}" if i % 3 else "" for i in range(n)]  # exact-id collisions
    orig = [f"o{i % 50}" if i % 17 == 0 else "" for i in range(n)]
    ph = [None if i % 97 == 0 else bytes(h[i]) for i in range(n)]
    table = pa.table({"key": keys, "sha256": sha, "orig_sha256": orig, "phash": pa.array(ph, pa.binary(32))})
    for exact, hamming in ((True, 20), (False, 8), (True, None)):
        old_batch = dedup.BATCH
        dedup.BATCH = 256  # many batches, so in-batch and cross-batch candidates both occur
        try:
            res = dedup.find_duplicates(table, hamming, exact)
        finally:
            dedup.BATCH = old_batch
        want_dup, want_kept = {}, []
        kept_ph, exact_ids = [], {}
        for k, s, o, p in sorted(zip(keys, sha, orig, ph)):
            eid = o or s
            if exact and eid and eid in exact_ids:
                want_dup[k] = (exact_ids[eid], 0, "exact")
                continue
            if hamming is not None and p is not None:
                hits = [(fingerprint.hamming(p, q), kk) for q, kk in kept_ph if fingerprint.hamming(p, q) <= hamming]
                if hits:
                    d, t = min(hits)
                    want_dup[k] = (t, d, "near")
                    continue
            want_kept.append(k)
            if exact and eid:
                exact_ids.setdefault(eid, k)
            if p is not None:
                kept_ph.append((p, k))
        got = {k: (t, d, kd) for k, t, d, kd in zip(*(res.duplicates[c].to_pylist() for c in ("key", "duplicate_of", "distance", "kind")))}
        assert got == want_dup, (exact, hamming)
        assert sorted(res.kept.to_pylist()) == want_kept
        assert len(want_dup) > 400  # the planted copies and clusters are there to be found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Photos (256 px, q95) + exact byte copies + resized/re-encoded copies, and 300 distinct Fashion-MNIST
    train images (64 px, q90) + re-encoded copies (q60), as two img2dataset groups."""
    root = tmp_path_factory.mktemp("dedup")
    photos = [Image.open(p.path).convert("RGB") for p in offline.photo_corpus()]
    fm = offline.fashion_mnist("train")[0]
    rng = np.random.default_rng(3)
    fidx = rng.choice(len(fm), 300, replace=False)
    samples, expect = [], {}  # expect: key -> key it duplicates (None = kept)
    for i, im in enumerate(photos):
        data = encode(im, 95, short_side(im, 256))
        samples.append({"key": f"p{i:02d}", "image": data, "caption": f"photo {i}"})
        expect[f"p{i:02d}"] = None
        samples.append({"key": f"q{i:02d}a", "image": data, "caption": "same bytes"})  # exact copy
        samples.append({"key": f"q{i:02d}b", "image": encode(im, 60, short_side(im, 180)), "caption": "smaller copy"})
        expect[f"q{i:02d}a"] = expect[f"q{i:02d}b"] = f"p{i:02d}"
    for j, i in enumerate(fidx):
        samples.append({"key": f"f{j:03d}", "image": encode(fm[i], 90, (64, 64)), "caption": "a photo of clothes"})
        expect[f"f{j:03d}"] = None
        if j % 3 == 0:
            samples.append({"key": f"g{j:03d}", "image": encode(fm[i], 60, (64, 64)), "caption": "again"})
            expect[f"g{j:03d}"] = f"f{j:03d}"
    random.Random(0).shuffle(samples)  # shard order must not matter
    rows = write_group(str(root / "g0"), samples[:400]) + write_group(str(root / "g1"), samples[400:])
    rows += failed_rows(["x_failed1", "x_failed2"])
    led = ledger(rows)
    return led, fingerprint.fingerprint_ledger(led), expect, fidx


def _decisions(led: pa.Table) -> dict[str, str]:
    return {k: (r if s == "filtered" else s) for k, s, r in
            zip(led["key"].to_pylist(), led["status"].to_pylist(), led["reason"].to_pylist())}


def test_copies_collapse_and_distinct_images_survive(corpus):
    led, fps, expect, _ = corpus
    assert len(fps) == len(expect)
    out, report = apply_quality_report(led, fps, CFG)
    assert_one_status(led, out)
    got = _decisions(out)
    for k, target in expect.items():
        assert got[k] == ("success" if target is None else f"duplicate_of:{target}"), k
    assert got["x_failed1"] == "failed_to_download"
    n_dup = sum(t is not None for t in expect.values())
    assert report["dedup"]["duplicates"] == n_dup and report["dedup"]["by_kind"]["exact"] == 20
    print(f"\ndedup: {n_dup} planted copies all caught (max distance {report['dedup']['max_distance']}), "
          f"0/{len(expect) - n_dup} distinct images removed")


def test_kept_sample_is_the_smallest_key_and_order_independent(corpus):
    led, fps, _, _ = corpus
    a = _decisions(apply_quality(led, fps, CFG))
    perm = np.random.default_rng(1).permutation(len(led))
    b = _decisions(apply_quality(led.take(perm), fps.take(np.random.default_rng(2).permutation(len(fps))), CFG))
    assert a == b
    # exact-only and near-only both work on their own
    exact = _decisions(apply_quality(led, fps, QualityConfig(exact_dedup=True)))
    assert exact["q00a"] == "duplicate_of:p00" and exact["q00b"] == "success"
    near = _decisions(apply_quality(led, fps, QualityConfig(near_dup_hamming=20)))
    assert near["q00a"] == "duplicate_of:p00" and near["q00b"] == "duplicate_of:p00"


def test_incremental_rebuild_keeps_decisions(corpus, tmp_path):
    led, fps, _, fidx = corpus
    v1_keys = sorted(k for k in fps["key"].to_pylist() if not k.startswith("g"))  # the q60 Fashion copies come later
    v1 = led.filter(pc.is_in(led["key"], pa.array(v1_keys + ["x_failed1", "x_failed2"])))
    v1_out = apply_quality(v1, fps, CFG)
    prev = dedup.previous_table(v1_out, fps)
    # v2: new rows, including near copies whose keys sort BEFORE the v1 samples they copy ("a..." < "f...")
    fm = offline.fashion_mnist("train")[0]
    photo = Image.open(offline.photo_corpus()[2].path).convert("RGB")
    fm_idx = fidx[0]  # f000's source image
    new = [{"key": "a_new_copy_of_f000", "image": encode(fm[fm_idx], 70, (96, 96)), "caption": "new"},
           {"key": "a_new_copy_of_p02", "image": encode(photo, 80, short_side(photo, 200)), "caption": "new"},
           {"key": "z_new_distinct", "image": encode(fm[59999], 90, (64, 64)), "caption": "new"}]
    new_rows = write_group(str(tmp_path / "g2"), new)
    v2 = ledger(v1.to_pylist() + ledger([r for r in led.to_pylist() if r["key"].startswith("g")]).to_pylist() + new_rows)
    fps2 = pa.concat_tables([fps, fingerprint.fingerprint_ledger(ledger(new_rows))])
    v2_out = _decisions(apply_quality(v2, fps2, CFG, previous=prev))
    v1_dec = _decisions(v1_out)
    assert all(v2_out[k] == d for k, d in v1_dec.items())  # nothing decided in v1 moved
    assert v2_out["a_new_copy_of_f000"] == "duplicate_of:f000"
    assert v2_out["a_new_copy_of_p02"] == "duplicate_of:p02"
    assert v2_out["z_new_distinct"] == "success"
    assert v2_out["g000"] == "duplicate_of:f000"
    # without `previous`, the smallest key would win instead: the stability comes from `previous`
    fresh = _decisions(apply_quality(v2, fps2, CFG))
    assert fresh["a_new_copy_of_f000"] == "success" and fresh["f000"] == "duplicate_of:a_new_copy_of_f000"
    # an increment-only ledger (just the new rows) still points at the previous version's kept samples
    inc = _decisions(apply_quality(ledger(new_rows), fps2, CFG, previous=prev))
    assert inc == {"a_new_copy_of_f000": "duplicate_of:f000", "a_new_copy_of_p02": "duplicate_of:p02",
                   "z_new_distinct": "success"}


def test_run_quality_with_a_published_previous_version(corpus, tmp_path):
    """The dataset stage's path: fingerprints cached per shard, the previous version read from its
    published artifact (ledger.parquet + fingerprints.parquet) through quality.previous_dataset."""
    import pyarrow.parquet as pq

    from datasets import quality
    from slip_core import artifacts

    led, fps, _, _ = corpus
    v1 = led.filter(pc.invert(pc.starts_with(led["key"], "g")))
    v1_out, v1_fps, _ = quality.run_quality(v1, CFG)
    groups = {src.split("|")[0] for src in v1["source"].to_pylist() if src}
    for g in groups:  # each shard fingerprinted once, reused below
        assert len(list((Path(g) / fingerprint.CACHE_DIR).glob("*.parquet"))) == len(list((Path(g) / "out").glob("*.tar")))
    root = str(tmp_path / "dataset-v1")
    (tmp_path / "dataset-v1").mkdir()
    published = fingerprint.attach_to_ledger(v1_out, v1_fps)  # fingerprints stored in the ledger
    assert published.column_names[-3:] == ["image_sha256", "orig_sha256", "phash"]
    assert published.select(v1_out.column_names).equals(v1_out)
    pq.write_table(published, f"{root}/ledger.parquet")
    murl = artifacts.publish(artifacts.build_manifest(root, ["ledger.parquet"], kind="dataset", name="quality-test"), root)
    v2 = led  # v1 + the Fashion copies "g..."
    out2, fps2, report = quality.run_quality(v2, QualityConfig(exact_dedup=True, near_dup_hamming=20, previous_dataset=murl))
    d1, d2 = _decisions(v1_out), _decisions(out2)
    assert all(d2[k] == v for k, v in d1.items())
    assert all(d2[k].startswith("duplicate_of:f") for k in d2 if k.startswith("g"))
    assert report["dedup"]["by_kind"].get("previous", 0) == sum(v.startswith("duplicate_of") for v in d1.values())
    assert fps2.sort_by("key").equals(fps.sort_by("key"))
    with pytest.raises(KeyError, match="without the quality pass"):
        dedup.previous_table(v1_out)


def test_audit_a_published_dataset(tmp_path, capsys):
    """`python -m datasets.quality MANIFEST`: the report for a dataset published without the pass."""
    import io
    import json
    import tarfile

    import pyarrow.parquet as pq

    from datasets.quality import __main__ as quality_cli
    from slip_core import artifacts

    photos = [Image.open(p.path).convert("RGB") for p in offline.photo_corpus()[:4]]
    blobs = {"a": encode(photos[0], 90, (96, 96)), "b": encode(photos[1], 90, (96, 96)),
             "c": encode(photos[0], 50, (64, 64)), "d": encode(photos[2], 90, (96, 96))}  # c is a copy of a
    root = tmp_path / "ds"
    (root / "shards").mkdir(parents=True)
    with tarfile.open(root / "shards" / "00000.tar", "w") as tf:
        for k, data in blobs.items():
            for ext, payload in (("jpg", data), ("txt", b"a photo")):
                ti = tarfile.TarInfo(f"{k}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    rows = [{"key": k, "url": "", "status": "success", "reason": "", "attempt": "", "source": "",
             "shard": "shards/00000.tar", "width": 96, "height": 96} for k in blobs]
    pq.write_table(ledger(rows + failed_rows(["e"])), root / "ledger.parquet")
    murl = artifacts.publish(artifacts.build_manifest(str(root), ["shards/00000.tar", "ledger.parquet"], kind="dataset",
                                                      name="audit"), str(root))
    assert quality_cli.main([murl, "--preset", "off", "--config", '{"exact_dedup": true, "near_dup_hamming": 20}']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["success_in"] == 4 and report["filtered"] == 1 and report["by_reason"] == {"duplicate_of": 1}
