"""The dataset stage's scale mechanics on a synthetic img2dataset work folder (datasets/synthetic.py: real
parquet, real tars, no network): shard-level mixing of a table sorted by user, incremental publish (an
increment writes shards for the new samples only and references the rest), the loader's full shard list,
`slip dataset gc`, determinism, the size+mtime verify fast path, and file modes under a umask."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets import gc, plan, publish, synthetic
from datasets.config import make_config
from slip_core import artifacts, storage
from slip_core.data import dataset_shards, shard_urls

CFG = make_config({"name": "scale", "number_sample_per_shard": 100, "shards_per_group": 4}, "tiny")


def _ranks(x):
    return np.argsort(np.argsort(np.asarray(x)))


def test_rows_are_shuffled_across_shards_on_a_table_sorted_by_user(tmp_path):
    """50 users x 100 rows, sorted by user (as YFCC is by upload): every img2dataset shard must be a draw from
    the whole table, not one user's run."""
    users = np.repeat(np.arange(50), 100)
    keys = [f"{i:09d}" for i in range(len(users))]
    pq.write_table(pa.table({"key": keys, "url": [f"http://127.0.0.1:9/{k}.jpg" for k in keys],
                             "caption": [f"photo by user {u}" for u in users], "user": users.astype(str)}),
                   tmp_path / "t.parquet")
    groups = plan.plan(str(tmp_path / "t.parquet"), str(tmp_path / "work"), CFG)
    order = pa.concat_tables([pq.read_table(os.path.join(g.path, "input.parquet")) for g in groups])
    assert sorted(order["sample_id"].to_pylist()) == keys  # a permutation: every row once
    pos_user = np.array([int(u) for u in order["user"].to_pylist()])
    src = np.array([int(k) for k in order["sample_id"].to_pylist()])
    rho = np.corrcoef(_ranks(src), np.arange(len(src)))[0, 1]  # Spearman: source line vs position
    assert abs(rho) < 0.05, rho
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, pos_user, -1]) != 0))
    assert runs.mean() < 1.1, runs.mean()  # sorted input: runs of 100; shuffled: ~1.02
    for s in range(len(order) // 100):  # each 100-row img2dataset shard holds many users
        assert len(set(pos_user[s * 100:(s + 1) * 100])) > 30
    # seeded: the same seed gives the same permutation, another seed another one
    groups2 = plan.plan(str(tmp_path / "t.parquet"), str(tmp_path / "work2"), CFG)
    assert pa.concat_tables([pq.read_table(os.path.join(g.path, "input.parquet")) for g in groups2]).equals(order)
    other = make_config({"name": "scale", "number_sample_per_shard": 100, "shards_per_group": 4, "shuffle_seed": 1}, "tiny")
    groups3 = plan.plan(str(tmp_path / "t.parquet"), str(tmp_path / "work3"), other)
    assert pq.read_table(os.path.join(groups3[0].path, "input.parquet"))["sample_id"].to_pylist() != \
        order["sample_id"].to_pylist()[:groups3[0].n_rows]


def _tar_bytes(root: str) -> dict[str, bytes]:
    d = os.path.join(root, "shards")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))} if os.path.isdir(d) else {}


def test_incremental_publish_gc_and_determinism(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    os.umask(0o022)
    store, work = str(tmp_path / "store"), str(tmp_path / "store" / "dataset-work" / "scale")
    table1 = str(tmp_path / "t1.parquet")
    synthetic.write_table(table1, 1000)
    synthetic.build_work(table1, work, CFG)
    v1 = publish.publish(table1, work, CFG, store)
    m1 = artifacts.load_verified(v1, full=True)
    root1 = artifacts.artifact_root(v1)
    assert m1.metrics["num_samples"] == 900  # every 10th row failed
    # every file honours the umask (0644), not mkstemp's 0600
    assert stat.S_IMODE(os.stat(os.path.join(root1, "ledger.parquet")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(root1, m1.files[0].path)).st_mode) == 0o644

    # +1% rows: only their shard is written, the rest is referenced by path + sha256
    table2 = str(tmp_path / "t2.parquet")
    pq.write_table(pa.concat_tables([pq.read_table(table1), _rows(1000, 10)]), table2)
    synthetic.fake_download(plan.plan(table2, work, CFG))
    v2 = publish.publish(table2, work, CFG, store)
    m2 = artifacts.load_verified(v2, full=True)
    root2 = artifacts.artifact_root(v2)
    own = [f for f in m2.files if f.path.startswith("shards/")]
    reused = [f for f in m2.files if f.path.startswith("../")]
    assert len(own) == 1 and len(reused) == len([f for f in m1.files if f.path.startswith("shards/")])
    assert sum(f.size for f in own) < 0.05 * sum(f.size for f in reused)  # ~1% of the bytes
    urls = shard_urls(v2)  # the loader reads the version's full shard list
    assert len(urls) == len(own) + len(reused) and all(os.path.exists(u) for u in urls)
    n = sum(1 for u in urls for _ in _members(u)) // 3
    assert n == m2.metrics["num_samples"] == 909
    assert sum(s.samples for s in dataset_shards(v2)) == 909  # per-shard counts for the loader's full passes
    stats = json.load(open(os.path.join(root2, "stats.json")))
    assert stats["incremental"]["new_samples"] == 9 and stats["incremental"]["reused_shards"] == len(reused)

    # a referenced shard that changes is caught by v2's own verification
    victim = artifacts.resolve(root2, reused[0].path)
    data = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    assert artifacts.verify(v2) == [f"sha256 mismatch: {reused[0].path}"]
    with open(victim, "wb") as f:
        f.write(data)
    assert artifacts.verify(v2) == []

    # gc: nothing is unreferenced while v1 and v2 exist; an unpublished folder's shards are
    orphan = os.path.join(store, "dataset", "scale-orphan", "shards")
    os.makedirs(orphan)
    open(os.path.join(orphan, "00000.tar"), "wb").write(b"x" * 1024)
    assert gc.collect(store, min_age_s=0)["unreferenced"] == [os.path.join(orphan, "00000.tar")]
    assert gc.collect(store)["unreferenced"] == []  # too young: a build may be writing it
    assert gc.collect(store, delete=True, min_age_s=0)["bytes"] == 1024 and not os.listdir(orphan)
    assert artifacts.verify(v1) == [] and artifacts.verify(v2) == []

    # determinism: the same inputs and history give byte-identical shards and ledger
    store_b, work_b = str(tmp_path / "b" / "store"), str(tmp_path / "b" / "store" / "dataset-work" / "scale")
    synthetic.build_work(table1, work_b, CFG)
    v1b = publish.publish(table1, work_b, CFG, store_b)
    synthetic.fake_download(plan.plan(table2, work_b, CFG))
    v2b = publish.publish(table2, work_b, CFG, store_b)
    assert _tar_bytes(artifacts.artifact_root(v1b)) == _tar_bytes(root1)
    assert _tar_bytes(artifacts.artifact_root(v2b)) == _tar_bytes(root2)
    shards = lambda m: [(f.path.rsplit("/", 2)[-2:], f.sha256) for f in m.files if f.path.endswith(".tar")]  # noqa: E731
    assert shards(artifacts.load_manifest(v2b)) == shards(m2)  # (artifact names differ: they hash the work path)


def _rows(start: int, n: int) -> pa.Table:
    keys = [f"{i:09d}" for i in range(start, start + n)]
    return pa.table({"key": keys, "url": [f"http://127.0.0.1:9/img/{k}.jpg" for k in keys],
                     "caption": [f"a photo number {k}" for k in keys]})


def _members(url: str):
    import tarfile

    with tarfile.open(url) as tf:
        yield from tf.getmembers()


def test_verify_fast_path_rehashes_a_rewritten_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "a"
    root.mkdir()
    (root / "f.bin").write_bytes(b"a" * 4096)
    murl = artifacts.publish(artifacts.build_manifest(str(root), ["f.bin"], kind="t", name="t"), str(root))
    assert artifacts.verify(murl) == []  # full hash, remembered under (size, mtime_ns, inode)
    calls = []
    monkeypatch.setattr(storage, "sha256_file", lambda u, _f=storage.sha256_file: calls.append(u) or _f(u))
    assert artifacts.verify(murl) == [] and calls == []  # unchanged: not read again
    (root / "f.bin").write_bytes(b"b" * 4096)  # same size, new bytes: new stamp
    assert artifacts.verify(murl) == ["sha256 mismatch: f.bin"] and len(calls) == 1
    assert artifacts.verify(murl, full=True) == ["sha256 mismatch: f.bin"] and len(calls) == 2


def test_manifest_paths_cannot_leave_the_store():
    for bad in ("../../etc/passwd", "/etc/passwd", "../x/../../y", "a/../../b", "../only"):
        with pytest.raises(artifacts.ManifestError):
            artifacts.resolve("/s/dataset/v2", bad)
    assert artifacts.resolve("/s/dataset/v2", "../v1/shards/0.tar") == "/s/dataset/v1/shards/0.tar"
    assert artifacts.resolve("s3://b/dataset/v2", "../v1/shards/0.tar") == "s3://b/dataset/v1/shards/0.tar"


def test_dataset_stage_processes_do_not_import_torch():
    """The stage's modules (ledger, publish, quality pass, the CLI) must not pay torch's ~570 MB / ~5 s per process:
    slip_core.tarsamples restates webdataset's key rule instead of importing webdataset (which imports torch)."""
    import subprocess
    import sys

    code = ("import sys; import datasets.pipeline, datasets.publish, datasets.quality.apply, datasets.gc, flows.build_dataset; "
            "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_member_key_split_equals_webdatasets():
    from webdataset.tariterators import base_plus_ext

    from slip_core import tarsamples

    names = ["000000001.jpg", "a/b/000.tar.gz", "x.y.z", "noext", "a/.b", ".hidden", "a.b/c", "a.b/c.d", "dir/", "a/b.",
             "..", "a..b", "/abs/k.png", "k.JPG", "a/b/c/d.e.f.g", "", "./k.txt", "k\u00e9.t\u00e9", "a b.c d"]
    for n in names:
        assert tarsamples.base_plus_ext(n) == base_plus_ext(n), n
