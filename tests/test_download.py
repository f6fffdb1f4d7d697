"""Dataset stage end to end without Prefect: real HTTP server on 127.0.0.1, real images, real img2dataset
CLI, real webdataset. Every input row's fate is asserted from the ledger; incremental, retry-failed and
kill-and-rerun are checked against the server's request counts."""
from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datasets import download, pipeline
from datasets.httpserve import serve_directory
from slip_core import artifacts
from tests._dataset_util import TEST_CONFIG, Row, fault_rows, huge_png, write_images, write_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
    return download.make_config({**TEST_CONFIG, "name": "test", **kw}, "tiny")


def _ledger(manifest_url):
    return pq.read_table(os.path.join(artifacts.artifact_root(manifest_url), "ledger.parquet")).to_pylist()


def _tar_keys(manifest_url):
    root = artifacts.artifact_root(manifest_url)
    keys = []
    for tar in sorted(glob.glob(os.path.join(root, "shards", "*.tar"))):
        keys += [s["__key__"] for s in wds.WebDataset(tar, shardshuffle=False)]
    return keys


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("dl")
    img_dir = str(d / "images")
    images = write_images(img_dir)
    huge_png(os.path.join(img_dir, "huge.png"))
    hits = collections.Counter()
    with serve_directory(img_dir, faults=True, hits=hits) as base:
        rows = fault_rows(base, images, img_dir)
        corpus = write_metadata(str(d / "yfcc100m_dataset"), str(d / "subset.tsv"), rows, malformed_at=5)
        store = str(d / "store")
        t0 = time.time()
        murl = pipeline.build(corpus.metadata, store, _cfg(), subset=corpus.subset)
        yield {"d": d, "img_dir": img_dir, "images": images, "base": base, "hits": hits, "corpus": corpus,
               "store": store, "manifest": murl, "seconds": time.time() - t0}


def test_every_row_has_its_expected_status_and_reason(built):
    ledger = {r["key"]: r for r in _ledger(built["manifest"])}
    corpus = built["corpus"]
    assert set(ledger) == set(corpus.keys)  # subset rows exactly; the non-subset row is absent
    for key, row in corpus.keys.items():
        status, reason = row.expect
        assert ledger[key]["status"] == status, (row.url, ledger[key])
        assert reason in ledger[key]["reason"], (row.url, ledger[key])
        assert (ledger[key]["shard"] != "") == (status == "success")
    m = artifacts.load_verified(built["manifest"])
    n_ok = sum(r.expect[0] == "success" for r in corpus.keys.values())
    assert m.kind == "dataset" and m.metrics["num_samples"] == n_ok == m.metrics["n_success"]
    stats = json.loads(open(os.path.join(artifacts.artifact_root(built["manifest"]), "stats.json")).read())
    assert stats["filter"]["malformed"] == 1 and stats["malformed_lines"] == [corpus.malformed_line]
    assert stats["filter"]["decode_errors"] == 1 and stats["filter"]["not_in_subset"] == 1
    assert stats["by_status"]["filtered"] == 1
    assert m.upstream["captions"].kind == "caption-table"


def test_shards_open_with_plain_webdataset(built):
    root = artifacts.artifact_root(built["manifest"])
    sizes = json.loads(open(os.path.join(root, "sizes.json")).read())
    urls = [os.path.join(root, p) for p in sorted(sizes)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(samples) == sum(sizes.values()) == artifacts.load_manifest(built["manifest"]).metrics["num_samples"]
    ledger = {r["key"]: r for r in _ledger(built["manifest"])}
    for key, img, txt, meta in samples:
        assert img.size == (64, 64)
        assert ledger[key]["status"] == "success" and meta["key"] == key == meta["sample_id"]
        assert "title" in meta and "description" in meta  # SPEC §9.1: caption chosen at load time
        assert txt == (meta["title"] or meta["description"])
    non_utf8 = [m for _, _, _, m in samples if "\ufffd" in m["title"]]
    assert len(non_utf8) == 1 and non_utf8[0]["title"] == "caf\ufffd bold photo"  # <b> tags removed (SLIP cleaning)
    assert len({k for k, *_ in samples}) == len(samples)


def test_unchanged_rerun_downloads_nothing_and_concurrent_builds_are_refused(built):
    before = sum(built["hits"].values())
    assert pipeline.build(built["corpus"].metadata, built["store"], _cfg(), subset=built["corpus"].subset) == built["manifest"]
    assert sum(built["hits"].values()) == before
    with download.work_lock(download.work_dir(built["store"], _cfg())):
        with pytest.raises(RuntimeError, match="another dataset build"):
            pipeline.build(built["corpus"].metadata, built["store"], _cfg(), subset=built["corpus"].subset)


def _copy_store(built, name):
    store = str(built["d"] / name)
    shutil.copytree(built["store"], store)
    return store


def test_incremental_snapshot_downloads_only_new_rows(built):
    store = _copy_store(built, "store_incr")
    old = built["corpus"]
    rows = list(old.rows) + [Row(f"{built['base']}/{rel}?new", t, d) for rel, t, d in built["images"][-3:]]
    snap = write_metadata(str(built["d"] / "snap2"), str(built["d"] / "snap2_subset.tsv"), rows, malformed_at=5)
    hits_before = collections.Counter(built["hits"])
    murl = pipeline.build(snap.metadata, store, _cfg(), subset=snap.subset)
    new_hits = built["hits"] - hits_before
    assert sorted(new_hits) == sorted(f"/{rel}?new" for rel, _, _ in built["images"][-3:])  # nothing else fetched
    ledger = {r["key"]: r for r in _ledger(murl)}
    assert set(ledger) == set(snap.keys)
    for key, row in snap.keys.items():
        assert ledger[key]["status"] == row.expect[0], (key, row.url)
    attempts = sorted(glob.glob(os.path.join(download.work_dir(store, _cfg()), "attempts", "*")))
    assert len(attempts) == 2
    new_input = pq.read_table(os.path.join(attempts[1], "g00000", "input.parquet"))["sample_id"].to_pylist()
    assert sorted(new_input) == sorted(k for k in snap.keys if k not in old.keys)
    assert sorted(_tar_keys(murl)) == sorted(k for k, r in ledger.items() if r["status"] == "success")


def test_retry_failed_retries_only_failed_rows_and_merges(built):
    store = _copy_store(built, "store_retry")
    shutil.copyfile(os.path.join(built["img_dir"], built["images"][3][0]), os.path.join(built["img_dir"], "late.jpg"))
    try:
        before = {r["key"]: r for r in _ledger(built["manifest"])}
        hits_before = collections.Counter(built["hits"])
        murl = pipeline.build(built["corpus"].metadata, store, _cfg(), subset=built["corpus"].subset, retry_failed=True)
    finally:
        os.unlink(os.path.join(built["img_dir"], "late.jpg"))
    after = {r["key"]: r for r in _ledger(murl)}
    failed = {k for k, r in before.items() if r["status"].startswith("failed")}
    refetched = {p for p in built["hits"] - hits_before if not p.startswith("/_fault/loop/") or p.endswith("/0")}
    assert refetched == {r.url.split(built["base"])[1] for k, r in built["corpus"].keys.items() if k in failed}
    late = next(k for k, r in built["corpus"].keys.items() if r.url.endswith("/late.jpg"))
    assert after[late]["status"] == "success" and before[late]["status"] == "failed_to_download"
    for k in before:
        if k != late:
            assert after[k]["status"] == before[k]["status"], k
    assert sorted(_tar_keys(murl)) == sorted(k for k, r in after.items() if r["status"] == "success")


def test_kill_and_rerun_loses_nothing_and_duplicates_nothing(built, tmp_path):
    """SIGKILL the driver mid-download (its img2dataset child and pool workers are left behind), rerun:
    every row ends with one status, each sample is in exactly one shard, finished shards are not refetched."""
    hits = collections.Counter()
    img_dir = built["img_dir"]
    with serve_directory(img_dir, faults=True, hits=hits) as base:
        rows = [Row(f"{base}/_fault/sleep/0.4?k={i}", f"slow photo {i}") for i in range(24)]
        corpus = write_metadata(str(tmp_path / "meta"), str(tmp_path / "subset.tsv"), rows)
        store = str(tmp_path / "store")
        conf = {**TEST_CONFIG, "name": "kill", "number_sample_per_shard": 4, "processes_count": 1, "thread_count": 1}
        cmd = [sys.executable, "-m", "datasets.pipeline", corpus.metadata, store, "--subset", corpus.subset,
               "--preset", "tiny", "--config", json.dumps(conf)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
        cfg = download.make_config(conf, "tiny")
        out = os.path.join(download.work_dir(store, cfg), "attempts", "*", "g00000", "out", "*_stats.json")
        deadline = time.time() + 120
        while len(glob.glob(out)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        done_before = {int(os.path.basename(p).split("_")[0]) for p in glob.glob(out)}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 2 <= len(done_before) < 6, "the kill must land mid-download"
        murl = pipeline.build(corpus.metadata, store, cfg, subset=corpus.subset)
    ledger = _ledger(murl)
    assert len(ledger) == 24 and all(r["status"] == "success" for r in ledger)
    keys = _tar_keys(murl)
    assert len(keys) == len(set(keys)) == 24
    # rows of shards finished before the kill were fetched exactly once
    for s in done_before:
        for i in range(4 * s, 4 * s + 4):
            assert hits[f"/_fault/sleep/0.4?k={i}"] == 1, i
    assert all(hits[f"/_fault/sleep/0.4?k={i}"] >= 1 for i in range(24))
