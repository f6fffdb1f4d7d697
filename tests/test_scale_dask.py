"""CPU stages on Dask through prefect-dask: results identical to the single-process / thread runner.

* Metadata filtering: a generated ~20k-row YFCC100M file (25 and 23 columns; malformed lines, lines of
  the other layout, non-UTF-8 bytes, HTML/URLs in captions, a subset) filtered by the
  `filter-yfcc-distributed` flow on a real dask.distributed LocalCluster (worker processes) must give
  row-for-row the table and exactly the report of one `yfcc.filter_yfcc` call.
* Verification: the `verify-dataset-distributed` flow on Dask reports nothing for a good dataset and,
  for a damaged one, exactly artifacts.verify's problems plus the shard content problems; same on threads.
Real Prefect server (session fixture); the Dask workers report their task runs to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time

import pyarrow.parquet as pq
import pytest

pytest.importorskip("prefect_dask")

from datasets.sources import yfcc, yfcc_chunks  # noqa: E402
from flows import filter_distributed as fd  # noqa: E402
from flows.runners import task_runner, with_runner  # noqa: E402
from slip_core import artifacts  # noqa: E402
from tests._train_util import fashion_samples, write_dataset  # noqa: E402

pytestmark = pytest.mark.prefect
WORDS = "the a photo of my cat dog <b>beach</b> sunset café http://x.y/z www.q.com <a href='u'>link</a> +plus% %zz".split()


def write_yfcc(path: str, subset: str, n: int, columns: int = 25, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f, open(subset, "w") as s:
        for i in range(n):
            if i % 997 == 5:
                f.write(b"garbage\tline\n")
                continue
            if i % 1999 == 7:  # a line with the *other* layout's field count
                f.write(b"\t".join([b"x"] * (48 - columns)) + b"\n")
                continue
            title = " ".join(rng.choices(WORDS, k=rng.randint(0, 5)))
            desc = " ".join(rng.choices(WORDS, k=rng.randint(0, 12)))
            line = yfcc.format_row(i, 10**6 + i, hashlib.md5(str(i).encode()).hexdigest(), title, desc,
                                   f"http://farm1.staticflickr.com/{i}.jpg", columns=columns).encode()
            if i % 501 == 3:
                line = line.replace(b"photo", b"ph\xe9oto", 1)  # not UTF-8
            f.write(line + b"\n")
            if rng.random() < 0.3:
                s.write(f"{i}\t{10**6 + i}\t-\n")


@pytest.fixture(scope="module")
def yfcc_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("yfcc")
    out = {}
    for cols, n in ((25, 20000), (23, 6000)):
        meta, sub = str(d / f"meta{cols}"), str(d / f"subset{cols}.tsv")
        write_yfcc(meta, sub, n, cols)
        ref = str(d / f"ref{cols}.parquet")
        report = yfcc.filter_yfcc(meta, ref, subset=sub).to_dict()
        out[cols] = {"meta": meta, "subset": sub, "ref": ref, "report": report, "dir": d}
    return out


def _same_as_reference(f: dict, output: str, report: dict) -> None:
    ref, got = pq.read_table(f["ref"]), pq.read_table(output)
    assert got.schema == ref.schema and got.num_rows == ref.num_rows > 1000
    assert got.equals(ref)  # row for row, every column
    assert report == f["report"]
    assert json.load(open(output + ".report.json")) == f["report"]
    assert not [p for p in os.listdir(os.path.dirname(output)) if ".parts" in p]  # parts cleaned up


def test_ranges_start_on_lines_of_the_file_layout(tmp_path):
    # The cut target lands on a 23-field line inside a 25-column file: it must stay in the previous range
    # (it would otherwise fix the wrong layout for the next one), and the result must not change.
    rows = [yfcc.format_row(i, 10**6 + i, "h", f"t{i}", "d", f"http://x/{i}.jpg").encode() + b"\n" for i in range(40)]
    odd = b"\t".join([b"y" * 300] * 23) + b"\n"  # long: the middle of the file falls inside the two odd lines
    data = b"".join(rows[:20]) + odd + odd + b"".join(rows[20:])
    meta = tmp_path / "m"
    meta.write_bytes(data)
    cut_at = len(b"".join(rows[:20]))
    ranges = yfcc_chunks.plan_ranges(str(meta), 2)
    assert ranges == [(0, cut_at + 2 * len(odd)), (cut_at + 2 * len(odd), -1)]  # cut moved past both odd lines
    got = yfcc_chunks.filter_yfcc_ranges(str(meta), str(tmp_path / "o.parquet"), n_chunks=2)
    want = yfcc.filter_yfcc(str(meta), str(tmp_path / "r.parquet"))
    assert got.to_dict() == want.to_dict() and want.malformed == 2
    assert pq.read_table(tmp_path / "o.parquet").equals(pq.read_table(tmp_path / "r.parquet"))
    assert sorted(os.listdir(tmp_path)) == ["m", "o.parquet", "o.parquet.report.json", "r.parquet", "r.parquet.report.json"]
    import bz2
    (tmp_path / "m.bz2").write_bytes(bz2.compress(data))
    assert yfcc_chunks.plan_ranges(str(tmp_path / "m.bz2"), 4) == [(0, -1)]  # no byte ranges in bz2


def test_runner_names():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner("threads"), ThreadPoolTaskRunner)
    r = task_runner("dask", n_workers=3)
    assert isinstance(r, DaskTaskRunner) and r.cluster_kwargs["n_workers"] == 3
    assert task_runner("dask://10.1.2.3:8786").address == "tcp://10.1.2.3:8786"
    with pytest.raises(ValueError, match="unknown task runner"):
        task_runner("spark")


def test_filter_on_a_temporary_local_cluster_equals_filter_yfcc(prefect_server, yfcc_files):
    f = yfcc_files[25]
    out = str(f["dir"] / "dask25.parquet")
    t0 = time.time()
    report = with_runner(fd.filter_yfcc_distributed, "dask", n_workers=2)(f["meta"], out, f["subset"], chunks=6)
    print(f"dask LocalCluster filter: {time.time() - t0:.1f}s")
    _same_as_reference(f, out, report)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def test_filter_23_columns_on_a_running_cluster_and_on_threads(prefect_server, yfcc_files, cluster):
    from distributed import Client

    f = yfcc_files[23]  # rows numbered by position: needs the line-count pass for the offsets
    n_ranges = len(yfcc_chunks.plan_ranges(f["meta"], 5))
    with Client(cluster) as client:
        executed = lambda: sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())  # noqa: E731
        before = executed()
        for runner in (cluster, "threads"):
            out = str(f["dir"] / f"out23-{'threads' if runner == 'threads' else 'dask'}.parquet")
            report = with_runner(fd.filter_yfcc_distributed, runner)(f["meta"], out, f["subset"], chunks=5)
            _same_as_reference(f, out, report)
        # the Dask run's count-lines and filter-range tasks ran in the cluster's worker processes
        assert n_ranges == 5 and executed() - before == 2 * n_ranges


def test_verify_dataset_on_dask_equals_local_checks(prefect_server, cluster, tmp_path):
    murl = write_dataset(str(tmp_path / "ds"), fashion_samples(30), per_shard=8)
    verify = with_runner(fd.verify_dataset_distributed, cluster)
    assert verify(murl, files_per_task=2) == [] == artifacts.verify(murl)
    root = artifacts.artifact_root(murl)
    with open(os.path.join(root, "shards", "00001.tar"), "r+b") as fh:  # cut a shard short
        fh.truncate(3000)
    sizes = json.load(open(os.path.join(root, "sizes.json")))
    sizes["shards/00002.tar"] += 1  # and claim a sample shard 2 does not have
    open(os.path.join(root, "sizes.json"), "w").write(json.dumps(sizes))
    got = verify(murl, files_per_task=2)
    assert got[:2] == artifacts.verify(murl) == ["size mismatch: shards/00001.tar", "size mismatch: sizes.json"]
    assert got[2].startswith("unreadable shard: shards/00001.tar") or "shards/00001.tar" in got[2]
    assert "sample count mismatch: shards/00002.tar has 8, sizes.json says 9" in got
    assert with_runner(fd.verify_dataset_distributed, "threads")(murl, files_per_task=3) == got
