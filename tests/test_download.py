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
import socket
import struct
import subprocess
import sys
import time
import zlib

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datasets import config as dataset_config
from datasets import img2dataset_bounded, pipeline, work
from datasets.sources import yfcc
from datasets.httpserve import serve_directory
from slip_core import artifacts
from slip_core.data import shard_urls
from tests._dataset_util import BAD_LINES, TEST_CONFIG, Row, fault_rows, huge_png, write_images, write_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_BOUND_S = 90  # the fault build (~20 s idle): without the per-image bounds, the drip rows never end
BOUND = f"< {BUILD_BOUND_S} s"


def _cfg(**kw):
    # subprocess_timeout_s: a hang fails the build (run_group kills img2dataset) instead of the test session
    return dataset_config.make_config({**TEST_CONFIG, "name": "test", "subprocess_timeout_s": 2 * BUILD_BOUND_S, **kw}, "tiny")


def _ledger(manifest_url):
    return pq.read_table(os.path.join(artifacts.artifact_root(manifest_url), "ledger.parquet")).to_pylist()


def _tar_keys(manifest_url):
    """Keys of every shard the version lists (its own and, when incremental, earlier versions' shards)."""
    keys = []
    for tar in shard_urls(manifest_url):
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
        corpus = write_metadata(str(d / "yfcc100m_dataset"), str(d / "subset.tsv"), rows, malformed_at=5,
                                n_bad=len(BAD_LINES))
        store = str(d / "store")
        t0 = time.time()
        murl = pipeline.build(corpus.metadata, store, _cfg(), subset=corpus.subset)
        yield {"d": d, "img_dir": img_dir, "images": images, "base": base, "hits": hits, "corpus": corpus,
               "store": store, "manifest": murl, "seconds": time.time() - t0}


def test_every_row_has_its_expected_status_and_reason(built, fault_log):
    """Every hostile input of fault_rows / BAD_LINES ends with one recorded fate, and the build ends in bounded time."""
    assert built["seconds"] < BUILD_BOUND_S
    rows = _ledger(built["manifest"])
    ledger = {r["key"]: r for r in rows if r["key"] is not None}
    corpus = built["corpus"]
    assert set(ledger) == set(corpus.keys)  # subset rows exactly; the non-subset row is absent
    # every malformed metadata line has its own ledger row: no key, its line number and what is wrong
    bad = sorted((r["line_number"], r["status"]) for r in rows if r["key"] is None)
    assert bad == [(ln, "filtered") for ln in sorted(corpus.bad_lines.values())]
    assert all(r["reason"].startswith("malformed row: ") for r in rows if r["key"] is None)
    for key, row in corpus.keys.items():
        status, reason = row.expect
        assert ledger[key]["status"] == status, (row.url, ledger[key])
        assert reason in ledger[key]["reason"], (row.url, ledger[key])
        assert (ledger[key]["shard"] != "") == (status == "success")
        assert ledger[key]["url"] == row.url  # the original, also where it was percent-encoded for the download
    m = artifacts.load_verified(built["manifest"])
    n_ok = sum(r.expect[0] == "success" for r in corpus.keys.values())
    assert m.kind == "dataset" and m.metrics["num_samples"] == n_ok == m.metrics["n_success"]
    stats = json.loads(open(os.path.join(artifacts.artifact_root(built["manifest"]), "stats.json")).read())
    filt = stats["filter"]
    assert filt["malformed"] == len(BAD_LINES) and stats["malformed_lines"] == sorted(corpus.bad_lines.values())
    assert filt["decode_errors"] == 1 and filt["not_in_subset"] == 1 and filt["truncated_text"] == 2
    assert stats["by_status"]["filtered"] == 3 + len(BAD_LINES)  # + the malformed lines, one ledger row each
    assert m.upstream["captions"].kind == "caption-table"

    for key, row in corpus.keys.items():
        if row.fault and row.stage == "download":
            fault_log.record("input", "download", row.fault, f"{ledger[key]['status']}: {ledger[key]['reason']}", bound=BOUND)
    by_fault = {r.fault: (k, r) for k, r in corpus.keys.items() if r.fault}
    key, _ = by_fault["title not valid UTF-8 (latin-1 bytes)"]
    fault_log.record("input", "filter", "title not valid UTF-8 (latin-1 bytes)",
                     f"kept, decoded with U+FFFD, counted (decode_errors {filt['decode_errors']}); "
                     f"{ledger[key]['status']}", bound=BOUND)
    absent = next(r for r in corpus.rows if not r.in_subset)
    fault_log.record("input", "filter", absent.fault,
                     f"dropped, counted (not_in_subset {filt['not_in_subset']}); no ledger row", bound=BOUND)
    for label in corpus.bad_lines:
        fault_log.record("input", "filter", label, f"skipped, counted and its line listed (malformed "
                         f"{filt['malformed']}, malformed_lines)", bound=BOUND)
    for fault in ("1 MB description", "1 MB title of '<a' repeated (regex backtracking bait)"):
        key, _ = by_fault[fault]
        fault_log.record("input", "filter", fault, f"text cut to {yfcc.MAX_TEXT_CHARS} characters, counted "
                         f"(truncated_text {filt['truncated_text']}); {ledger[key]['status']}", bound=BOUND)


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
    metas = {key: meta for key, _, _, meta in samples}
    for key, row in built["corpus"].keys.items():  # the 1 MB captions: downloaded, text cut to its first MAX_TEXT_CHARS
        if row.fault.startswith("1 MB"):
            assert metas[key]["title"] == row.title[:yfcc.MAX_TEXT_CHARS]
            assert metas[key]["description"] == row.description[:yfcc.MAX_TEXT_CHARS]
    assert len({k for k, *_ in samples}) == len(samples)


def test_bounded_fetch_ends_hostile_answers_in_time_and_fetches_only_http(tmp_path, fault_log):
    """img2dataset_bounded.fetch, what img2dataset's workers download with: each endless answer ends at the
    deadline or the byte cap, and no URL other than http(s) is opened, not even as a redirect target (a real
    listener on the ftp port sees no connection)."""
    limits = img2dataset_bounded.Limits(deadline_s=1.0, max_bytes=1 << 20, max_pixels=89_478_485)
    (tmp_path / "ok.bin").write_bytes(b"x" * 5000)
    for name, (w, h) in {"bomb10000.png": (10000, 10000), "bomb50000.png": (50000, 50000), "small.png": (4000, 3000)}.items():
        (tmp_path / name).write_bytes(png_header(w, h))
    ftp = socket.create_server(("127.0.0.1", 0))
    ftp.settimeout(0)
    ftp_url = f"ftp://127.0.0.1:{ftp.getsockname()[1]}/photo.jpg"
    data_url = "data:image/gif;base64,R0lGODlhAQABAAAAACw="

    def fetch(url):
        t0 = time.monotonic()
        _, stream, err = img2dataset_bounded.fetch((0, url), 2, None, None, limits=limits)
        return stream, err, time.monotonic() - t0

    with serve_directory(str(tmp_path), faults=True) as base:
        stream, err, _ = fetch(f"{base}/ok.bin")
        assert err is None and stream.getvalue() == b"x" * 5000
        for path, want in [("/_fault/drip/0.2", "download exceeded the 1 s deadline"),
                           ("/_fault/dripheaders/0.2", "download exceeded the 1 s deadline"),
                           ("/_fault/endless", f"response exceeded max_image_bytes ({1 << 20})"),
                           ("/_fault/endless/5000000", f"Content-Length 5000000 exceeds max_image_bytes ({1 << 20})")]:
            stream, err, seconds = fetch(base + path)
            assert stream is None and err == want and seconds < limits.deadline_s + 1.0, (path, err, seconds)
        for side, shown in ((10000, "10000x10000 = 100000000"), (50000, "2500000000")):  # PIL warns / refuses itself
            stream, err, _ = fetch(f"{base}/bomb{side}.png")
            assert stream is None and err == f"image header declares {shown} pixels, over max_image_pixels (89478485)", err
        stream, err, _ = fetch(f"{base}/small.png")
        assert err is None and stream.getvalue() == png_header(4000, 3000)
        refused = {}
        for url in (ftp_url, "file:///etc/passwd", data_url, f"{base}/_fault/redirect/{ftp_url}",
                    f"{base}/_fault/redirect/file:///etc/passwd", f"{base}/_fault/redirect/{data_url}"):
            stream, err, seconds = fetch(url)
            assert stream is None and seconds < 1.0, (url, err)
            refused[url.replace(base, "").replace(ftp_url, "ftp://...")] = err
    with pytest.raises(BlockingIOError):
        ftp.accept()  # nothing connected to the ftp port, directly or by redirect
    socket.create_connection(ftp.getsockname()).close()
    ftp.accept()[0].close()  # ... and the check above would have seen a connection
    ftp.close()
    assert refused["ftp://..."] == "unsupported url scheme 'ftp'" and refused["file:///etc/passwd"] == "unsupported url scheme 'file'"
    assert refused[data_url] == "unsupported url scheme 'data'"
    assert refused["/_fault/redirect/ftp://..."] == "HTTP Error 302: redirect to a non-http(s) URL refused (ftp:)"
    assert all("is not allowed" in refused[f"/_fault/redirect/{u}"] for u in ("file:///etc/passwd", data_url))
    fault_log.record("security", "download", "only http(s) fetched: ftp://, file://, data: URLs, and 302 redirects to each",
                     f"URLs: {refused['ftp://...']}, {refused['file:///etc/passwd']}, {refused[data_url]}; "
                     f"redirect to ftp: {refused['/_fault/redirect/ftp://...']}; redirects to file:, data: refused by urllib "
                     "('is not allowed'); 0 connections reached the ftp port", bound="< 1 s each")
    fault_log.record("security", "download", "pixel cap before decoding: PNGs whose headers declare 10000x10000 and "
                     "50000x50000 (max_image_pixels 89478485)", "refused from the header, nothing decoded: 'image header "
                     "declares ... pixels, over max_image_pixels'; a 4000x3000 one passes", bound="< 1 s each")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height over a few bytes of pixel data: what a bomb's header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_unchanged_rerun_downloads_nothing_and_concurrent_builds_are_refused(built):
    before = sum(built["hits"].values())
    assert pipeline.build(built["corpus"].metadata, built["store"], _cfg(), subset=built["corpus"].subset) == built["manifest"]
    assert sum(built["hits"].values()) == before
    with work.work_lock(work.work_dir(built["store"], _cfg())):
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
    ledger = {r["key"]: r for r in _ledger(murl) if r["key"] is not None}
    assert set(ledger) == set(snap.keys)
    for key, row in snap.keys.items():
        assert ledger[key]["status"] == row.expect[0], (key, row.url)
    attempts = sorted(glob.glob(os.path.join(work.work_dir(store, _cfg()), "attempts", "*")))
    assert len(attempts) == 2
    new_input = pq.read_table(os.path.join(attempts[1], "g00000", "input.parquet"))["sample_id"].to_pylist()
    assert sorted(new_input) == sorted(k for k in snap.keys if k not in old.keys)
    assert sorted(_tar_keys(murl)) == sorted(k for k, r in ledger.items() if r["status"] == "success")
    # incremental publish: the new version wrote shards for the new samples only, and references the
    # earlier version's shards (verified like its own files)
    m = artifacts.load_verified(murl, full=True)
    own = [f for f in m.files if f.path.startswith("shards/")]
    reused = [f for f in m.files if f.path.startswith("../")]
    old_root = os.path.basename(artifacts.artifact_root(built["manifest"]))
    assert reused and all(f.path.startswith(f"../{old_root}/shards/") for f in reused)
    own_keys = [s["__key__"] for s in wds.WebDataset([os.path.join(artifacts.artifact_root(murl), f.path) for f in own],
                                                       shardshuffle=False)]
    new_ok = {k for k in snap.keys if k not in old.keys and ledger[k]["status"] == "success"}
    assert set(own_keys) == new_ok
    stats = json.load(open(os.path.join(artifacts.artifact_root(murl), "stats.json")))
    assert stats["incremental"] == {"extends": old_root, "reused_shards": len(reused), "new_shards": len(own),
                                    "new_samples": len(new_ok)}


def test_retry_failed_retries_only_failed_rows_and_merges(built):
    store = _copy_store(built, "store_retry")
    shutil.copyfile(os.path.join(built["img_dir"], built["images"][3][0]), os.path.join(built["img_dir"], "late.jpg"))
    try:
        before = {r["key"]: r for r in _ledger(built["manifest"]) if r["key"] is not None}
        hits_before = collections.Counter(built["hits"])
        murl = pipeline.build(built["corpus"].metadata, store, _cfg(), subset=built["corpus"].subset, retry_failed=True)
    finally:
        os.unlink(os.path.join(built["img_dir"], "late.jpg"))
    after = {r["key"]: r for r in _ledger(murl) if r["key"] is not None}
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
        cfg = dataset_config.make_config(conf, "tiny")
        out = os.path.join(work.work_dir(store, cfg), "attempts", "*", "g00000", "out", "*_stats.json")
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
    # rows of shards finished before the kill were fetched exactly once (rows are shuffled into shards:
    # shard s holds positions 4s..4s+3 of the group's frozen input)
    (group_input,) = glob.glob(os.path.join(work.work_dir(store, cfg), "attempts", "*", "g00000", "input.parquet"))
    order = pq.read_table(group_input)["sample_id"].to_pylist()
    assert sorted(order) != order or len(order) < 2  # the shuffle is in effect
    for s in done_before:
        for key in order[4 * s:4 * s + 4]:
            assert hits[f"/_fault/sleep/0.4?k={int(key)}"] == 1, key
    assert all(hits[f"/_fault/sleep/0.4?k={i}"] >= 1 for i in range(24))
