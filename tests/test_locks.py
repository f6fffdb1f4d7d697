"""The one lock mechanism (slip_core/locks.py): leases on local folders (flock) and on a real S3 API server
(moto, conditional PUTs), with real processes as holders (issue 19.2, issue 15.6)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from datasets import work as dataset_work
from slip_core import artifacts, locks, storage
from tests._s3_util import s3_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = textwrap.dedent("""
    import sys, time
    from slip_core import locks
    folder, hold_s, ttl = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    with locks.writer_lease(folder, purpose="test holder", ttl_s=ttl):
        print("held", flush=True)
        time.sleep(hold_s)
""")


def _holder(folder: str, hold_s: float = 600, ttl_s: float = locks.DEFAULT_TTL_S) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, folder, str(hold_s), str(ttl_s)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


@pytest.fixture
def s3():
    with s3_server() as bucket:
        yield bucket


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, request, where,
                                                                                      fault_log):
    folder = str(tmp_path / "run") if where == "local" else storage.join(request.getfixturevalue("s3"), "store/run")
    holder = _holder(folder)
    try:
        t0 = time.monotonic()
        with pytest.raises(locks.LockBusy) as busy:
            with locks.writer_lease(folder, wait_s=1.0):
                pass
        waited = time.monotonic() - t0
        msg = str(busy.value)
        assert "\n" not in msg and f"host {locks.HOST}, pid {holder.pid}" in msg and "refusing" in msg, msg
        assert 1.0 <= waited < 5.0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t0 = time.monotonic()
        with locks.writer_lease(folder, wait_s=10) as held:  # same host, holder's pid gone: taken over at once
            assert held.holder.pid == os.getpid()
        took = time.monotonic() - t0
        assert took < 3.0, took
    finally:
        _stop(holder)
    if where == "s3":
        fs, path = storage.url_to_fs(storage.join(folder, locks.LOCK_NAME))
        assert not fs.exists(path)  # released: the lease object is deleted
    fault_log.record("artifact", "artifacts", f"a second writer of a {where} run folder while a live process holds it; "
                     "then the holder is SIGKILLed",
                     "the second writer waits its 1 s, then gets a one-line refusal naming the holder's host and pid; "
                     "after the SIGKILL the next writer takes the lease at once (same host, holder's pid gone)",
                     bound="< 5 s")


def test_local_writer_stops_when_its_folder_is_removed_or_published(tmp_path):
    folder = str(tmp_path / "run")
    with locks.writer_lease(folder, purpose="trainer"):
        locks.ensure_writer(os.path.join(folder, "checkpoints", "x.pt"))  # held: nothing happens
        os.rename(folder, str(tmp_path / "gone"))
        with pytest.raises(locks.LeaseLost, match="was removed"):
            locks.ensure_writer(folder)
    assert not os.path.exists(folder)  # releasing did not recreate it
    published = str(tmp_path / "artifact" / "manifest.json")
    with locks.writer_lease(folder, watch=(published,)):
        locks.ensure_writer(folder)
        storage.atomic_write_text(published, "{}")
        with pytest.raises(locks.LeaseLost, match="published by another run"):
            locks.ensure_writer(folder)
    with locks.writer_lease(folder):  # recreated under the writer: a new file, not the one it locked
        os.rename(folder, str(tmp_path / "gone2"))
        os.makedirs(folder)
        open(os.path.join(folder, locks.LOCK_NAME), "w").close()
        with pytest.raises(locks.LeaseLost, match="replaced"):
            locks.ensure_writer(folder)
    locks.ensure_writer(folder)  # no lease held any more: library use without one is not an error


RACER = textwrap.dedent("""
    import os, sys, time
    from slip_core import locks
    folder, go, log = sys.argv[1], sys.argv[2], sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.005)
    with locks.writer_lease(folder, purpose="racer", ttl_s=5.0):
        t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        time.sleep(0.5)
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {t0} {t1}\\n")
""")


def test_s3_lease_racers_from_a_start_line_hold_it_one_at_a_time(tmp_path, s3, fault_log):
    n = 4
    folder, go, log = storage.join(s3, "store/dataset-work/demo-1"), str(tmp_path / "go"), str(tmp_path / "log")
    env = {**os.environ, "PYTHONPATH": REPO}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, folder, go, log], env=env, stderr=subprocess.PIPE, text=True)
              for _ in range(n)]
    time.sleep(3.0)  # every interpreter at the start line (s3fs imports are slow on 2 cores)
    open(go, "w").close()
    for p in racers:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    spans = sorted(tuple(map(float, line.split()[1:])) for line in open(log))
    assert len(spans) == n
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # no two holders at once
    fault_log.record("artifact", "artifacts", f"{n} processes racing for one s3:// lease object from a start line "
                     "(conditional PUT, If-None-Match: *)",
                     f"all {n} held it in turn, never two at once (hold intervals disjoint on the system clock)",
                     bound="< 120 s")


def _plant_foreign_lease(lock_url: str, ttl_s: float, purpose: str = "dataset build") -> locks.Holder:
    """A lease object as a process on another host writes it (that host is not reachable from here)."""
    holder = locks.Holder("node-b.invalid", 4242, 0, "f" * 32, "2026-01-01T00:00:00+00:00", purpose, ttl_s)
    fs, path = storage.url_to_fs(lock_url)
    bucket, key, _ = fs.split_path(path)
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=holder.to_json().encode(), Metadata={"holder": holder.to_json()})
    return holder


def test_s3_lease_of_another_host_blocks_until_it_expires(s3, fault_log):
    work = storage.join(s3, "store/dataset-work/yfcc15m-abc")
    _plant_foreign_lease(storage.join(work, locks.LOCK_NAME), ttl_s=3.0)
    with pytest.raises(RuntimeError, match=r"another dataset build \(dataset build: host node-b.invalid, pid 4242"):
        with dataset_work.work_lock(work):
            pass
    told = []
    t0 = time.monotonic()
    with locks.writer_lease(work, wait_s=30, on_wait=told.append) as held:  # not renewed: expires after its ttl
        took = time.monotonic() - t0
        assert held.holder.host == locks.HOST
    assert told and told[0].host == "node-b.invalid"
    assert 1.0 <= took < 3.0 + locks.CLOCK_SLACK_S + 4.0, took
    fault_log.record("artifact", "dataset", "s3:// dataset build while a build on another host holds the work folder's "
                     "lease (fresh), then stops renewing it",
                     "the build is refused with one line naming the other host and pid; once the lease is a ttl old "
                     "(store's clock) a waiting build takes it over", bound="< 10 s")


def test_s3_lease_is_renewed_by_its_holder_and_lost_when_removed(tmp_path, s3, fault_log):
    folder = storage.join(s3, "store/checkpoint/run")
    holder = _holder(folder, hold_s=600, ttl_s=2.0)  # renewed every 0.67 s
    try:
        with pytest.raises(locks.LockBusy, match=f"pid {holder.pid}"):
            with locks.writer_lease(folder, wait_s=6.0):  # three ttls: renewals keep it alive
                pass
    finally:
        _stop(holder)
    with locks.writer_lease(folder, ttl_s=1.5) as held:
        fs, path = storage.url_to_fs(storage.join(folder, locks.LOCK_NAME))
        fs.rm(path)
        deadline = time.monotonic() + 10
        while not held.lost() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(locks.LeaseLost, match="was removed"):
            locks.ensure_writer(folder)
    fault_log.record("artifact", "artifacts", "s3:// lease held past three times its ttl by a live holder; then its "
                     "lease object deleted under a holder",
                     "the holder's heartbeat renews it (a waiter is refused after 6 s); a deleted lease is noticed by "
                     "the holder's next heartbeat and its next write check raises LeaseLost", bound="< 10 s")


def test_s3_stage_lock_is_a_lease_object_next_to_the_root(s3):
    root = storage.join(s3, "store/eval/x-0")
    assert artifacts.lock_path(root) == storage.join(s3, "store/eval/.x-0.lock")
    fs, path = storage.url_to_fs(artifacts.lock_path(root))
    with artifacts.stage_lock(root):
        assert json.loads(fs.cat_file(path))["pid"] == os.getpid()
        with pytest.raises(artifacts.StageBusy, match=f"still holds .* host {locks.HOST}, pid {os.getpid()}"):
            with artifacts.stage_lock(root, timeout_s=1.0):
                pass
    assert not fs.exists(path)
