"""SIGKILL the dataset stage at eight points, rerun, and prove nothing is lost or doubled (issue 8.1).

Seven points are named crash points in the code (slip_core/failpoints.py, armed through SLIP_FAILPOINTS in
the subprocess that runs `python -m datasets.pipeline` or `slip dataset build`); one is a kill from outside
mid-download, timed by img2dataset's `_stats.json` shard markers as in test_download.py. After every kill
the store must not hold anything that looks complete and is not (every manifest present verifies, every
non-temp file of the dataset folder equals the uninterrupted build's), and after the rerun the ledger holds
every subset row exactly once with its expected status, the shards hold each success key once and nothing
else, the manifest verifies, and every published file is byte-identical to an uninterrupted build's.

Byte-identical needs the same store path (stats.json and the ledger's `source` column name the work
folder), so every build here runs in `<tmp>/store` and the reference build is moved aside after it.
img2dataset is the cost (~9 s a call: torch import, spawned worker), hence the layout:
  - the kills before and during the download form one chain on one store (each rerun is the next kill),
    ending in a rerun that completes: four points for two img2dataset calls;
  - the publish points and the Prefect flow start from the reference store without its dataset folder,
    which is exactly the state a kill after the download leaves (the chain asserts that state).
"""
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

from datasets import config as dataset_config
from datasets import pipeline, work
from datasets.httpserve import serve_directory
from slip_core import artifacts
from tests._dataset_util import TEST_CONFIG, Row, write_images, write_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 samples per shard: 19 downloadable rows -> 5 img2dataset shards in one group, 17 successes -> 5 output shards.
CONF = {**TEST_CONFIG, "name": "crash", "number_sample_per_shard": 4, "thread_count": 4, "timeout": 5}
N_I2D_SHARDS = 5
SLOW_S = 1.5  # the one slow row (img2dataset shard 1): the window for the outside kill after shard 0
RUN_LIMIT_S = 120


def _cfg():
    return dataset_config.make_config(CONF, "tiny")


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real images behind a real HTTP server; every URL unique (`?r=i`) so the server counts each row's fetches."""
    d = tmp_path_factory.mktemp("crash")
    img_dir = str(d / "images")
    images = write_images(img_dir, n_photos=4, n_fashion=12)
    hits = collections.Counter()
    with serve_directory(img_dir, faults=True, hits=hits) as base:
        good = [Row(f"{base}/{rel}", t, desc) for rel, t, desc in images]
        rows = good[:5] + [Row(f"{base}/_fault/sleep/{SLOW_S}", "a slow photo"), good[5],
                           Row(f"{base}/_fault/404", "gone", expect=("failed_to_download", "HTTP Error 404")),
                           good[6], good[7],
                           Row(f"{base}/_fault/html", "an html page", expect=("failed_to_resize", "Image decoding error")),
                           Row("file://" + os.path.join(img_dir, images[0][0]), "a local file",
                               expect=("filtered", "unsupported url scheme 'file'")),
                           good[8],
                           Row(f"{base}/{images[1][0]}", "not in the subset", in_subset=False, expect=("absent", ""))]
        rows += good[9:]
        for i, r in enumerate(rows):
            if r.url.startswith("http"):
                r.url += f"?r={i}"
        c = write_metadata(str(d / "yfcc100m_dataset"), str(d / "subset.tsv"), rows, malformed_at=9)
        yield {"d": d, "corpus": c, "hits": hits, "store": str(d / "store")}


@pytest.fixture(scope="module")
def reference(corpus):
    """One uninterrupted build, moved aside so the crash runs can reuse its store path."""
    store = _fresh(corpus)
    murl = pipeline.build(corpus["corpus"].metadata, store, _cfg(), subset=corpus["corpus"].subset)
    ref = str(corpus["d"] / "reference")
    os.rename(store, ref)
    root = artifacts.artifact_root(murl).replace(store, ref, 1)
    assert artifacts.verify(root) == []
    return {"store": ref, "root": root, "rel": os.path.relpath(root, ref), "files": _visible_files(root)}


def _fresh(corpus) -> str:
    store = corpus["store"]
    if os.path.exists(store):
        shutil.rmtree(store)
    return store


def _downloaded_store(corpus, reference) -> str:
    """The reference store without its dataset folder: caption table published, every shard downloaded."""
    store = _fresh(corpus)
    shutil.copytree(reference["store"], store, ignore=lambda d, names: ["dataset"] if d == reference["store"] else [])
    return store


# ------------------------------------------------------------------------------------------- helpers

def _stage_cmd(corpus) -> list[str]:
    c = corpus["corpus"]
    return [sys.executable, "-m", "datasets.pipeline", c.metadata, corpus["store"], "--subset", c.subset,
            "--preset", "tiny", "--config", json.dumps(CONF)]


def _env(failpoints: str = "", **extra) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, SLIP_FAILPOINTS=failpoints, **extra)


def _run_killed(cmd: list[str], failpoint: str, **env) -> None:
    """Run `cmd` with one crash point armed; it must die by SIGKILL at that point."""
    r = subprocess.run(cmd, cwd=REPO, env=_env(failpoint, **env), capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert f"failpoint {failpoint.split(':')[0]} (hit" in r.stderr, r.stderr[-3000:]


def _visible_files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(dp, n), root) for dp, _, ns in os.walk(root) for n in ns if not n.startswith(".")}


def _temp_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(dp, n), root) for dp, _, ns in os.walk(root) for n in ns
                  if n.startswith(".") and n.endswith(".tmp"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _assert_nothing_looks_complete_that_is_not(store: str, reference) -> None:
    """After a kill: every manifest in the store verifies, and every non-temp file in a dataset folder is
    byte-identical to the uninterrupted build's file of that name (a partial one would differ)."""
    for m in glob.glob(os.path.join(store, "**", artifacts.MANIFEST_NAME), recursive=True):
        assert artifacts.verify(m) == [], m
    for root in glob.glob(os.path.join(store, "dataset", "*")):
        assert not os.path.exists(os.path.join(root, artifacts.MANIFEST_NAME)), "killed before the manifest"
        for rel in _visible_files(root):
            assert _read(os.path.join(root, rel)) == _read(os.path.join(reference["root"], rel)), rel


def _dataset_root(store: str) -> str:
    roots = glob.glob(os.path.join(store, "dataset", "*"))
    assert len(roots) == 1, roots
    return roots[0]


def _assert_complete_and_identical(murl: str, corpus, reference) -> str:
    """The rerun's dataset: every row once with its status, every success key once in the shards, the
    manifest verifies, every file byte-identical to the reference. Returns the observed summary."""
    root = artifacts.artifact_root(murl)
    assert artifacts.verify(murl) == []
    ledger = pq.read_table(os.path.join(root, "ledger.parquet")).to_pylist()
    keys = collections.Counter(r["key"] for r in ledger if r["key"] is not None)  # None: malformed lines
    expected = corpus["corpus"].keys
    assert set(keys) == set(expected) and set(keys.values()) == {1}, keys
    assert all(r["line_number"] is not None for r in ledger if r["key"] is None)
    by_key = {r["key"]: r for r in ledger if r["key"] is not None}
    for key, row in expected.items():
        status, reason = row.expect
        assert by_key[key]["status"] == status and reason in by_key[key]["reason"], (row.url, by_key[key])
    shards = sorted(glob.glob(os.path.join(root, "shards", "*.tar")))
    sample_keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    successes = {k for k, r in by_key.items() if r["status"] == "success"}
    assert len(sample_keys) == len(set(sample_keys)) and set(sample_keys) == successes
    m = artifacts.load_manifest(murl)
    assert _visible_files(root) == {f.path for f in m.files} | {artifacts.MANIFEST_NAME}  # no leftover partial
    assert _temp_files(root) == []
    assert _visible_files(root) == reference["files"]
    for rel in reference["files"] - {artifacts.MANIFEST_NAME}:
        assert _read(os.path.join(root, rel)) == _read(os.path.join(reference["root"], rel)), rel
    st = collections.Counter(r["status"] for r in ledger)
    return (f"{len(ledger)} subset rows each once ({st['success']} success, {st['failed_to_download']} failed_to_download, "
            f"{st['failed_to_resize']} failed_to_resize, {st['filtered']} filtered), {len(sample_keys)} shard keys = "
            f"success keys, 0 duplicates, manifest verifies, shards + ledger + sizes + stats byte-identical to the "
            f"uninterrupted build")


def _fetches(corpus, since: collections.Counter) -> collections.Counter:
    return corpus["hits"] - since


# ---------------------------------------------------------------------------------------------- tests

def test_kills_before_and_during_the_download_then_rerun(corpus, reference, fault_log):
    """One store killed four times in a row, each rerun dying at the next point; the last rerun completes."""
    store, cfg, c = _fresh(corpus), _cfg(), corpus["corpus"]
    hits0 = collections.Counter(corpus["hits"])
    cmd = _stage_cmd(corpus)

    # 1. during filtering: a batch of caption rows is in the open temp parquet
    _run_killed(cmd, "filter.batch_written")
    _assert_nothing_looks_complete_that_is_not(store, reference)
    (table_root,) = glob.glob(os.path.join(store, "caption-table", "*"))
    assert not glob.glob(os.path.join(table_root, "*")) and len(glob.glob(os.path.join(table_root, ".captions.parquet.*.tmp"))) == 1
    assert not os.path.exists(os.path.join(store, "dataset-work"))

    # 2. rerun, killed after the caption table is published, before anything is planned
    _run_killed(cmd, "dataset.table_published")
    _assert_nothing_looks_complete_that_is_not(store, reference)
    (table_manifest,) = glob.glob(os.path.join(store, "caption-table", "*", artifacts.MANIFEST_NAME))
    n_table_rows = pq.read_metadata(os.path.join(os.path.dirname(table_manifest), "captions.parquet")).num_rows
    assert n_table_rows == len(c.keys)
    assert _temp_files(table_root) == []  # the killed filter's temp parquet was cleaned up under the stage lock
    table_stat = os.stat(table_manifest)
    assert not os.path.exists(os.path.join(store, "dataset-work")) and sum(corpus["hits"].values()) == sum(hits0.values())

    # 3. rerun, SIGKILLed from outside once img2dataset has finished >= 1 shard (its child and pool worker live on)
    stats = os.path.join(work.work_dir(store, cfg), "attempts", "*", "g00000", "out", "*_stats.json")
    with open(os.path.join(str(corpus["d"]), "mid-download.log"), "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=log)
        deadline = time.time() + RUN_LIMIT_S
        while not glob.glob(stats) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        done_before = {int(os.path.basename(p).split("_")[0]) for p in glob.glob(stats)}
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert 1 <= len(done_before) < N_I2D_SHARDS, done_before
    # the URLs of those shards, from img2dataset's own per-shard parquet (rows are shuffled into shards)
    urls_before = [u for p in glob.glob(stats) if int(os.path.basename(p).split("_")[0]) in done_before
                   for u in pq.read_table(p.replace("_stats.json", ".parquet"), columns=["url"])["url"].to_pylist()]
    assert urls_before
    _assert_nothing_looks_complete_that_is_not(store, reference)
    assert not os.path.exists(os.path.join(store, "dataset"))
    assert os.stat(table_manifest).st_mtime_ns == table_stat.st_mtime_ns  # the table was reused, not rebuilt

    # 4. rerun, killed after the download group finished, before publishing
    _run_killed(cmd, "dataset.group_downloaded")
    _assert_nothing_looks_complete_that_is_not(store, reference)
    (attempt,) = work.all_attempts(work.work_dir(store, cfg))
    assert [work.group_complete(g) for g in attempt[1]] == [True]
    assert not os.path.exists(os.path.join(store, "dataset"))
    downloadable = [r.url.split("127.0.0.1:", 1)[1].split("/", 1)[1] for r in c.keys.values() if r.url.startswith("http")]
    fetched = _fetches(corpus, hits0)
    assert all(fetched["/" + u] >= 1 for u in downloadable)
    for url in urls_before:  # rows of shards finished before the outside kill were not fetched again
        u = url.split("127.0.0.1:", 1)[1].split("/", 1)[1] if "127.0.0.1:" in url else None
        if u in downloadable:
            assert fetched["/" + u] == 1, u
    assert set(fetched) == {"/" + u for u in downloadable}  # nothing outside the subset, no file:// row

    # 5. rerun to completion, in this process
    hits4 = collections.Counter(corpus["hits"])
    t0 = time.time()
    murl = pipeline.build(c.metadata, store, cfg, subset=c.subset)
    assert time.time() - t0 < RUN_LIMIT_S
    assert not _fetches(corpus, hits4)  # everything was downloaded already
    summary = _assert_complete_and_identical(murl, corpus, reference)

    final = f"the chain's last rerun: {summary}"
    fault_log.record("kill", "dataset", "SIGKILL during filtering (caption batch written, parquet still open)",
                     f"no manifest, only a hidden temp parquet; the rerun re-filtered ({n_table_rows} rows, manifest "
                     f"verifies); {final}", bound=f"< {RUN_LIMIT_S} s")
    fault_log.record("kill", "dataset", "SIGKILL after the caption table is published, before the download",
                     f"caption table verifies, nothing planned or fetched; the rerun reused the table; {final}",
                     bound=f"< {RUN_LIMIT_S} s")
    fault_log.record("kill", "dataset", "SIGKILL of the driver from outside mid-download (after img2dataset "
                     f"completed 1 to {N_I2D_SHARDS - 1} of its {N_I2D_SHARDS} shards)",
                     "no dataset folder; the rerun resumed the group: every row fetched, rows of shards finished "
                     f"before the kill fetched exactly once; {final}", bound=f"< {RUN_LIMIT_S} s")
    fault_log.record("kill", "dataset", "SIGKILL after the download, before publishing",
                     f"all {N_I2D_SHARDS} img2dataset shards complete, no dataset folder; the rerun fetched nothing "
                     f"and published; {final}", bound=f"< {RUN_LIMIT_S} s")


PUBLISH_POINTS = {
    # failpoint: (fault, visible dataset files after the kill, partial temp files after the kill)
    "publish.shard_closed:2": ("SIGKILL between output shards (shard 2 of 5 closed, shard 3 not begun)",
                               {"shards/00000.tar", "shards/00001.tar"}, 0),
    "publish.sample_written:10": ("SIGKILL mid-shard (10th sample written, shard 3 of 5 open)",
                                  {"shards/00000.tar", "shards/00001.tar"}, 1),
    "publish.before_manifest": ("SIGKILL during publish: shards, ledger, sizes, stats written, no manifest",
                                None, 0),  # None: every file but the manifest
}


@pytest.mark.parametrize("point", list(PUBLISH_POINTS))
def test_kill_during_publish_then_rerun(corpus, reference, fault_log, point):
    fault, visible, n_temp = PUBLISH_POINTS[point]
    visible = visible if visible is not None else reference["files"] - {artifacts.MANIFEST_NAME}
    store, c = _downloaded_store(corpus, reference), corpus["corpus"]
    hits0 = collections.Counter(corpus["hits"])
    _run_killed(_stage_cmd(corpus), point)
    _assert_nothing_looks_complete_that_is_not(store, reference)
    root = _dataset_root(store)
    assert _visible_files(root) == visible
    temps = _temp_files(root)
    assert len(temps) == n_temp and all(t.startswith("shards/.") for t in temps), temps

    t0 = time.time()
    murl = pipeline.build(c.metadata, store, _cfg(), subset=c.subset)
    assert time.time() - t0 < RUN_LIMIT_S
    assert not _fetches(corpus, hits0)
    summary = _assert_complete_and_identical(murl, corpus, reference)
    left = f"{len(visible)} complete files identical to the reference's" + (
        f" + {n_temp} partial shard under a hidden temp name" if n_temp else "")
    redo = "removed the partial and republished" if n_temp else "republished"
    fault_log.record("kill", "dataset", fault, f"no manifest, {left}; the rerun fetched nothing and {redo}: {summary}",
                     bound=f"< {RUN_LIMIT_S} s")


@pytest.mark.prefect
def test_kill_prefect_flow_during_publish_then_rerun(prefect_server, corpus, reference, fault_log):
    """`slip dataset build` (the Prefect flow, real server) SIGKILLed after its first output shard; the flow rerun completes."""
    from flows.build_dataset import build_dataset

    store, c = _downloaded_store(corpus, reference), corpus["corpus"]
    hits0 = collections.Counter(corpus["hits"])
    sets = [f"--set={k}={v}" for k, v in CONF.items()]
    _run_killed([sys.executable, "-m", "flows.cli", "dataset", "build", c.metadata, "--store", store, "--subset", c.subset,
                 "--preset", "tiny", *sets], "publish.shard_closed:1", PREFECT_API_URL=prefect_server)
    _assert_nothing_looks_complete_that_is_not(store, reference)
    assert _visible_files(_dataset_root(store)) == {"shards/00000.tar"}

    t0 = time.time()
    murl = build_dataset(c.metadata, store, config={**CONF, "preset": "tiny"}, subset=c.subset)
    assert time.time() - t0 < RUN_LIMIT_S
    assert not _fetches(corpus, hits0)
    summary = _assert_complete_and_identical(murl, corpus, reference)
    fault_log.record("kill", "dataset", "SIGKILL of the Prefect flow (`slip dataset build`) after its first output shard",
                     f"no manifest, 1 complete shard identical to the reference's; the flow rerun fetched nothing and "
                     f"published: {summary}", bound=f"< {RUN_LIMIT_S} s")


def test_failpoint_spec_is_parsed_and_checked():
    from slip_core import failpoints

    assert failpoints.parse("") == {}
    assert failpoints.parse("publish.shard_closed:2, dataset.table_published, eval.result:3@TERM") == {
        "publish.shard_closed": (2, signal.SIGKILL), "dataset.table_published": (1, signal.SIGKILL),
        "eval.result": (3, signal.SIGTERM)}
    for bad in ("x:0", "x:two", ":3", "x@HUP", "x:2@"):
        with pytest.raises(ValueError, match="SLIP_FAILPOINTS: bad entry"):
            failpoints.parse(bad)
    assert failpoints.failpoint("publish.shard_closed") is None  # not armed in this process: nothing happens
