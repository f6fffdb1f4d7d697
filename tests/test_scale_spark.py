"""img2dataset's pyspark distributor (Spark local mode, real JVM) gives the same dataset as multiprocessing.

Same URL list (real images + failing rows behind a real HTTP server on 127.0.0.1), two builds into two
stores: distributor "multiprocessing" and "pyspark" (datasets/img2dataset_spark.py, local[2], 512 MB driver).
Checked equal: every sample's key, image bytes sha256, caption and metadata; the ledger's (key, status,
reason, width, height); the published shard files byte for byte. One shard per group, so the Spark build
has three groups: they must all run in ONE Spark application, at the same time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datasets import config as dataset_config
from datasets import download, img2dataset_spark, pipeline, work
from datasets.httpserve import serve_directory
from slip_core import artifacts
from tests._dataset_util import TEST_CONFIG, Row, write_images, write_metadata

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime (JDK 17)")]


def _cfg(distributor: str):
    # Spark: local[2] (processes_count); multiprocessing: one worker process is enough to compare (2 shared cores).
    # One shard per group in both (img2dataset's own keys in the metadata are numbered per group): three groups.
    procs = 2 if distributor == "pyspark" else 1
    return dataset_config.make_config({**TEST_CONFIG, "name": "scale", "processes_count": procs, "distributor": distributor,
                                       "shards_per_group": 1}, "tiny")


def _samples(manifest_url: str) -> dict[str, dict]:
    root = artifacts.artifact_root(manifest_url)
    out = {}
    for tar in sorted(glob.glob(os.path.join(root, "shards", "*.tar"))):
        for s in wds.WebDataset(tar, shardshuffle=False):
            meta = json.loads(s["json"])
            out[s["__key__"]] = {"jpg_sha256": hashlib.sha256(s["jpg"]).hexdigest(), "txt": s["txt"].decode(),
                                 "meta": meta, "shard": os.path.basename(tar)}
    return out


def _ledger(manifest_url: str) -> list[tuple]:
    t = pq.read_table(os.path.join(artifacts.artifact_root(manifest_url), "ledger.parquet")).to_pydict()
    return sorted(zip(t["key"], t["status"], t["reason"], t["width"], t["height"]))


@pytest.fixture(scope="module", autouse=True)
def _small_driver():
    # A shared 2-core CI box: cap the local Spark driver JVM (our default is 1g).
    old = os.environ.get("SLIP_SPARK_CONF")
    os.environ["SLIP_SPARK_CONF"] = json.dumps({"spark.driver.memory": "512m", "spark.sql.shuffle.partitions": "2"})
    yield
    if old is None:
        os.environ.pop("SLIP_SPARK_CONF")
    else:
        os.environ["SLIP_SPARK_CONF"] = old


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("spark")
    img_dir = str(d / "images")
    images = write_images(img_dir, n_photos=4, n_fashion=10)
    with serve_directory(img_dir, faults=True) as base:
        rows = [Row(f"{base}/{rel}", t, desc) for rel, t, desc in images]
        rows += [Row(f"{base}/_fault/404", "gone"), Row(f"{base}/_fault/html", "an html page"),
                 Row(f"{base}/_fault/truncated/{images[0][0]}", "cut short"), Row(f"{base}/_fault/empty", "zero bytes")]
        corpus = write_metadata(str(d / "yfcc100m_dataset"), str(d / "subset.tsv"), rows)
        out = {"n_rows": len(rows)}
        for dist in ("multiprocessing", "pyspark"):
            t0 = time.time()
            out[f"{dist}_store"] = store = str(d / f"store-{dist}")
            out[dist] = pipeline.build(corpus.metadata, store, _cfg(dist), subset=corpus.subset)
            out[f"{dist}_s"] = time.time() - t0
    return out


def test_pyspark_runs_our_wrapper_and_stays_out_of_the_work_folder_identity():
    mp, sp = _cfg("multiprocessing"), _cfg("pyspark")
    cmd = download.img2dataset_command("in.parquet", "out", sp, [])
    assert cmd[1:3] == ["-m", "datasets.img2dataset_spark"] and "--distributor=pyspark" in cmd
    assert "--processes_count=2" in cmd
    assert download.img2dataset_command("in.parquet", "out", mp, [])[1:3] == ["-m", "datasets.img2dataset_bounded"]
    assert work.work_dir("/s", mp) == work.work_dir("/s", sp)  # parallelism, not content
    with pytest.raises(ValueError, match="distributor"):
        _cfg("dask")
    with pytest.raises(SystemExit, match="pyspark only"):  # checked before any JVM starts
        img2dataset_spark.main(["--distributor=multiprocessing"])
    conf = img2dataset_spark.spark_conf(["--processes_count=3"], {"SLIP_SPARK_CONF": '{"spark.driver.memory": "512m"}'})
    assert conf["spark.master"] == "local[3]" and conf["spark.driver.memory"] == "512m"
    conf = img2dataset_spark.spark_conf([], {"SLIP_SPARK_MASTER": "spark://head:7077"})
    assert conf["spark.master"] == "spark://head:7077" and "spark.driver.host" not in conf


def test_spark_and_multiprocessing_build_the_same_dataset(builds):
    mp, sp = builds["multiprocessing"], builds["pyspark"]
    a, b = _samples(mp), _samples(sp)
    assert len(a) == builds["n_rows"] - 4 and set(a) == set(b)  # 14 images ok, the 4 fault rows failed
    for key in a:
        assert a[key] == b[key], key
    la, lb = _ledger(mp), _ledger(sp)
    assert la == lb and len(la) == builds["n_rows"]
    assert {s for _, s, *_ in la} == {"success", "failed_to_download", "failed_to_resize"}
    ma, mb = artifacts.load_verified(mp), artifacts.load_verified(sp)
    shard_sha = lambda m: {f.path: f.sha256 for f in m.files if f.path.startswith("shards/")}  # noqa: E731
    assert shard_sha(ma) == shard_sha(mb) and len(shard_sha(ma)) >= 2
    assert ma.config["distributor"] == "multiprocessing" and mb.config["distributor"] == "pyspark"


def test_spark_really_ran(builds):
    # The Spark build's img2dataset log shows our session (local[2], small driver) did the work, not
    # img2dataset's own 16 GB one; the multiprocessing build never started Spark.
    def log(dist):
        paths = glob.glob(os.path.join(builds[f"{dist}_store"], "dataset-work", "*", "attempts", "*", "g*", "img2dataset.log"))
        assert paths, dist
        return "".join(open(p, errors="replace").read() for p in paths)

    spark_log = log("pyspark")
    assert "img2dataset_spark: Spark 4." in spark_log and "master local[2], driver memory 512m" in spark_log
    assert "No pyspark session found" not in spark_log
    assert "img2dataset_spark" not in log("multiprocessing")


def test_all_groups_ran_in_one_spark_application_concurrently(builds):
    import re

    paths = sorted(glob.glob(os.path.join(builds["pyspark_store"], "dataset-work", "*", "attempts", "*", "g*", "img2dataset.log")))
    assert len(paths) == 3  # 18 rows, 8 per shard, 1 shard per group
    apps, spans = set(), []
    for p in paths:
        text = open(p, errors="replace").read()
        apps |= set(re.findall(r"application (\S+);", text))
        (start,), (end,) = re.findall(r"group started ([0-9.]+)", text), re.findall(r"group finished ([0-9.]+)", text)
        spans.append((float(start), float(end)))
    assert len(apps) == 1, apps  # one SparkContext for every group
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # every group was running at one moment
    (driver,) = glob.glob(os.path.join(builds["pyspark_store"], "dataset-work", "*", "attempts", "*", "spark-driver.log"))
    assert open(driver).read().count("img2dataset_spark: application ") == 1 and "3 group(s)" in open(driver).read()
