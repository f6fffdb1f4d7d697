"""The per-shard perceptual hashing on each hash engine (datasets/quality/hash_engines.py), real components:
a fork process pool, a real dask.distributed LocalCluster (2 worker processes) and a real local Spark
(local[2], one session for the module). Each gives the serial tables shard for shard, really runs on the
engine's workers, writes the per-shard caches there, and a second call reads them and sends nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from datasets import publish, synthetic, work
from datasets.config import make_config
from datasets.quality import fingerprint as fp
from datasets.quality import hash_engines
from datasets.quality.config import QualityConfig

N_SHARDS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An img2dataset work folder of N_SHARDS shards of 30 small real JPEGs, and the serial fingerprints."""
    d = tmp_path_factory.mktemp("engines")
    cfg = make_config({"name": "fpe", "number_sample_per_shard": 30, "shards_per_group": N_SHARDS}, "tiny")
    synthetic.write_table(str(d / "t.parquet"), 30 * N_SHARDS)
    synthetic.build_work(str(d / "t.parquet"), str(d / "work"), cfg)
    tars = sorted(str(p) for p in (d / "work").rglob("out/*.tar"))
    assert len(tars) == N_SHARDS
    return {"work": d / "work", "table": str(d / "t.parquet"), "cfg": cfg, "tars": tars,
            "serial": [fp.shard_fingerprints(t, cache=False) for t in tars]}


def _fresh_copy(shards, dest) -> list[str]:
    """The work folder copied to `dest` (no caches yet); its tars in the same order."""
    shutil.copytree(shards["work"], dest)
    tars = [t.replace(str(shards["work"]), str(dest)) for t in shards["tars"]]
    assert not any(os.path.exists(fp.cache_url(t)) for t in tars)
    return tars


def _check(shards, tars, got) -> None:
    assert len(got) == len(shards["serial"])
    assert all(a.equals(b) for a, b in zip(shards["serial"], got))
    assert all(os.path.exists(fp.cache_url(t)) for t in tars)


def test_processes_engine_equals_serial_and_caches(shards, tmp_path):
    tars = _fresh_copy(shards, tmp_path / "w")
    t0 = time.perf_counter()
    _check(shards, tars, fp.map_shards(tars, workers=2, engine="processes"))
    print(f"\nprocesses (2 workers, {N_SHARDS} shards): {time.perf_counter() - t0:.2f}s")
    mtimes = [os.stat(fp.cache_url(t)).st_mtime_ns for t in tars]
    _check(shards, tars, fp.map_shards(tars, workers=2))
    assert mtimes == [os.stat(fp.cache_url(t)).st_mtime_ns for t in tars]  # read, not rewritten


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c.scheduler_address) as client:
        yield c.scheduler_address, lambda: sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


def test_dask_engine_runs_on_the_workers(shards, dask_cluster, tmp_path, monkeypatch):
    address, executed = dask_cluster
    monkeypatch.delenv(hash_engines.DASK_SCHEDULER_ENV, raising=False)
    tars = _fresh_copy(shards, tmp_path / "w")
    before = executed()
    t0 = time.perf_counter()
    _check(shards, tars, fp.map_shards(tars, engine="dask://" + address.split("://", 1)[1]))
    print(f"\ndask (LocalCluster, 2 worker processes, {N_SHARDS} shards): {time.perf_counter() - t0:.2f}s")
    assert executed() - before == N_SHARDS  # one task per shard, in the workers
    before = executed()
    _check(shards, tars, fp.map_shards(tars, engine=address))  # all cached: nothing is sent
    assert executed() == before
    # SLIP_DASK_SCHEDULER (host:port) overrides the configured engine
    tars = _fresh_copy(shards, tmp_path / "w2")
    monkeypatch.setenv(hash_engines.DASK_SCHEDULER_ENV, address.split("://", 1)[1])
    _check(shards, tars, fp.map_shards(tars, engine="processes"))
    assert executed() - before == N_SHARDS


def test_publish_hashes_on_the_configured_engine_and_the_engine_leaves_the_dataset_as_is(shards, dask_cluster,
                                                                                        tmp_path, monkeypatch):
    """The dataset stage's quality pass (publish.publish) hashes on DatasetConfig.hash_engine; publishing the
    same download again with another engine finds the same, complete dataset."""
    address, executed = dask_cluster
    monkeypatch.delenv(hash_engines.DASK_SCHEDULER_ENV, raising=False)
    dest = tmp_path / "work"
    tars = _fresh_copy(shards, dest)
    cfg = dataclasses.replace(shards["cfg"], quality=QualityConfig(exact_dedup=True), hash_engine=address)
    before = executed()
    murl = publish.publish(shards["table"], str(dest), cfg, str(tmp_path / "store"))
    assert executed() - before == N_SHARDS and all(os.path.exists(fp.cache_url(t)) for t in tars)
    again = dataclasses.replace(cfg, hash_engine="processes")
    assert publish.publish(shards["table"], str(dest), again, str(tmp_path / "store")) == murl
    assert executed() - before == N_SHARDS


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime (JDK 17)")
    pytest.importorskip("pyspark")
    from datasets import img2dataset_spark

    env = {"SLIP_SPARK_MASTER": "local[2]",  # a shared 2-core box: a small driver JVM
           "SLIP_SPARK_CONF": json.dumps({"spark.driver.memory": "512m", "spark.sql.shuffle.partitions": "2"})}
    session = img2dataset_spark.session([], environ=env, app_name="test-fingerprint-engines")
    yield session
    session.stop()


def _spark_tasks(sc, jobs: set[int]) -> int:
    """Completed tasks of the Spark jobs `jobs` (the status tracker keeps recent jobs' stages)."""
    tracker = sc.statusTracker()
    return sum(tracker.getStageInfo(s).numCompletedTasks for j in jobs for s in tracker.getJobInfo(j).stageIds)


def test_spark_engine_runs_as_spark_tasks_on_the_active_session(shards, spark, tmp_path, monkeypatch):
    monkeypatch.delenv(hash_engines.DASK_SCHEDULER_ENV, raising=False)
    sc = spark.sparkContext
    app = sc.applicationId
    tars = _fresh_copy(shards, tmp_path / "w")
    before = set(sc.statusTracker().getJobIdsForGroup())
    t0 = time.perf_counter()
    _check(shards, tars, fp.map_shards(tars, engine="spark"))
    print(f"\nspark (local[2], session already running, {N_SHARDS} shards): {time.perf_counter() - t0:.2f}s")
    new = set(sc.statusTracker().getJobIdsForGroup()) - before
    assert len(new) == 1 and _spark_tasks(sc, new) == N_SHARDS  # one partition per shard
    before = set(sc.statusTracker().getJobIdsForGroup())
    _check(shards, tars, fp.map_shards(tars, engine="spark"))  # all cached: no Spark job at all
    assert set(sc.statusTracker().getJobIdsForGroup()) == before
    # the running session was reused (no second application) and left running
    assert spark.sparkContext.applicationId == app and sc.parallelize([1, 2]).sum() == 3


OWN_SESSION = """
import json, sys
from pyspark import SparkContext
from datasets.quality import fingerprint as fp
tables = fp.map_shards(json.loads(sys.argv[1]), engine="spark:local[2]")
# the session the engine built for itself (no active one) is stopped again: no SparkContext is left
print(json.dumps({"rows": [t.num_rows for t in tables], "left": SparkContext._active_spark_context is not None}))
"""


@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime (JDK 17)")
def test_spark_engine_without_a_session_builds_one_like_the_distributor_and_stops_it(shards, tmp_path):
    """With no session in the process (a publish after a pyspark-distributor download, whose Spark app ran in
    its own process), the engine builds one through img2dataset_spark.session and stops it afterwards. Spark's
    own event log shows that application and its tasks."""
    pytest.importorskip("pyspark")
    tars = _fresh_copy(shards, tmp_path / "w")
    events = tmp_path / "events"
    events.mkdir()
    env = {k: v for k, v in os.environ.items() if k != hash_engines.DASK_SCHEDULER_ENV}
    env["SLIP_SPARK_CONF"] = json.dumps({"spark.driver.memory": "512m", "spark.eventLog.enabled": "true",
                                         "spark.eventLog.dir": events.as_uri(),
                                         "spark.eventLog.rolling.enabled": "false",  # one plain JSON-lines file
                                         "spark.eventLog.compress": "false"})
    r = subprocess.run([sys.executable, "-c", OWN_SESSION, json.dumps(tars)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"rows": [t.num_rows for t in shards["serial"]], "left": False}
    _check(shards, tars, [fp.shard_fingerprints(t) for t in tars])  # the caches the Spark workers wrote
    (log,) = [p for p in events.iterdir() if not p.name.endswith(".inprogress")]  # complete: the app was stopped
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["App Name"] for e in lines if e["Event"] == "SparkListenerApplicationStart"] == [hash_engines.SPARK_APP_NAME]
    assert sum(e["Event"] == "SparkListenerTaskEnd" for e in lines) == N_SHARDS


def test_hash_engine_is_an_execution_setting_outside_the_dataset_identity(tmp_path):
    base = make_config({"name": "fpe"}, "tiny")
    ident = publish.dataset_identity("0" * 64, base).sha256
    for engine in ("dask://10.0.0.5:8786", "spark", "spark://head:7077"):
        other = make_config({"name": "fpe", "hash_engine": engine}, "tiny")
        assert other.hash_engine == engine
        assert publish.dataset_identity("0" * 64, other).sha256 == ident
        assert work.work_dir(str(tmp_path), other) == work.work_dir(str(tmp_path), base)
    # a setting that does change the output does change the identity (the comparison can fail)
    assert publish.dataset_identity("0" * 64, make_config({"name": "fpe", "encode_quality": 80}, "tiny")).sha256 != ident


@pytest.mark.parametrize("bad", ["dask", "ray", "processes:4", ""])
def test_bad_hash_engine_is_a_one_line_error_listing_the_engines(bad):
    with pytest.raises(ValueError) as e:
        make_config({"hash_engine": bad}, "tiny")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("DatasetConfig.hash_engine")
    assert "dask://host:port" in msg and ("processes" in msg or bad == "dask")
