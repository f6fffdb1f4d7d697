"""Two runs of the same stage at once must not corrupt the store (issue 8, item 4).

Real processes: the `slip train` and `slip eval run` CLIs started twice at the same moment against the session's
Prefect server, and bare publisher processes racing on one artifact root (local and s3:// on a real
S3-compatible server). artifacts.stage_lock serialises them: one run builds and publishes, the other waits,
finds the intact manifest and reuses it; the store ends with one root whose manifest verifies, no temp
files and no interleaved content.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from slip_core import artifacts, storage
from tests._s3_util import s3_server
from tests._stage_runs import STAGE_TIMEOUT_S, TRAIN_SETS, eval_pair_s3, last_json, train_pair

pytestmark = pytest.mark.prefect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FILES = {"checkpoint.pt", "checkpoint_best.pt", "metrics.jsonl", "loss_curve.png", "config.json",
               "final_metrics.json"}  # checkpoint_best.pt: the tiny preset evaluates during training
EVAL_FILES = {"results.json", "report.md", "report.html", "results.png"}


def _one_of_each(flags: list[bool]) -> bool:
    return sorted(flags) == [False, True]


def test_two_concurrent_train_runs_share_one_verified_checkpoint(prefect_server, tmp_path, fault_log):
    tp = train_pair(prefect_server)
    assert [r.returncode for r in tp.runs] == [0, 0], [r.stdout[-3000:] for r in tp.runs]
    urls = {last_json(r.stdout)["checkpoint"] for r in tp.runs}
    assert len(urls) == 1, urls
    url = urls.pop()
    root = artifacts.artifact_root(url)
    name = root.rsplit("/", 1)[-1]
    entries = sorted(os.listdir(os.path.join(tp.store, "checkpoint")))
    assert entries == sorted([name, f".{name}.lock"]), entries  # one root (+ its lock file)
    files = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
    assert files == TRAIN_FILES | {"manifest.json"}, files  # no run/ folder, no .tmp files left
    m = artifacts.load_verified(url)
    recs = [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl"))]
    steps = [r["step"] for r in recs if "loss" in r]  # (the others: in-training evaluations)
    assert steps == [1, 2, 3, 4] and m.metrics["steps"] == 4, steps  # one trainer wrote it: no step twice or missing
    logs = [r.stdout for r in tp.runs]
    assert _one_of_each(["launching:" in t for t in logs]), logs
    assert _one_of_each(["published by a concurrent run" in t for t in logs]), logs
    assert any("waiting for it to finish" in t for t in logs)

    # The same weights as one run on its own (a trainer resuming from the other's checkpoints would differ).
    from flows.pretrain import make_config
    from slip_core.checkpoint import load_state
    from slip_core.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_config("tiny", TRAIN_SETS), tp.dataset, str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    got = load_state(os.path.join(root, "checkpoint.pt"))["state_dict"]
    ref = load_state(str(tmp_path / "single" / "checkpoint.pt"))["state_dict"]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    fault_log.record("artifact", "train", "two concurrent runs of train (`slip train`, same dataset and config, "
                     "started at once)",
                     "both exit 0 with the same checkpoint URL; one trained, the other waited on the stage lock and "
                     "reused the published manifest; one root that verifies, no temp files, metrics.jsonl steps "
                     "1-4 once each, weights equal to a single run's", bound=f"< {STAGE_TIMEOUT_S} s")


def test_two_concurrent_eval_runs_share_one_verified_artifact(prefect_server, fault_log):
    ep = eval_pair_s3(prefect_server)
    assert [r.returncode for r in ep.runs] == [0, 0], [r.stdout[-3000:] for r in ep.runs]
    urls = {last_json(r.stdout)["eval"] for r in ep.runs}
    assert len(urls) == 1, urls
    url = urls.pop()
    assert ep.problems == []
    root_key = artifacts.artifact_root(url).split("://", 1)[1]
    eval_prefix = ep.store.split("://", 1)[1] + "/eval/"
    in_eval = sorted(k[len(eval_prefix):] for k in ep.objects if k.startswith(eval_prefix))
    name = root_key.rsplit("/", 1)[-1]
    assert in_eval == sorted(f"{name}/{f}" for f in EVAL_FILES | {"manifest.json"}), in_eval  # one root, no strays
    logs = [r.stdout for r in ep.runs]
    assert _one_of_each(["eval artifact: " in t for t in logs]), logs
    assert _one_of_each(["eval artifact already complete" in t for t in logs]), logs
    assert all("waiting for it to finish" in t for t in logs)  # both met at the lock (start line, _stage_runs)
    assert set(ep.single) == EVAL_FILES
    for f in EVAL_FILES:  # byte-equal to what a single, uncontended run publishes
        assert ep.objects[f"{root_key}/{f}"] == ep.single[f], f
    fault_log.record("artifact", "eval", "two concurrent runs of eval (`slip eval run`, same checkpoint and "
                     "settings, s3:// store, both released at the stage lock at the same moment)",
                     "both exit 0 with the same eval URL; one published, the other waited on the stage lock and "
                     "found the artifact complete; one root that verifies, no stray objects, files byte-equal "
                     "to a single run's", bound=f"< {STAGE_TIMEOUT_S} s")


# ------------------------------------------------------------------------------------ publish itself
PUBLISHER = textwrap.dedent("""
    import os, sys, time
    from slip_core import artifacts, storage

    root, go, i, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    while not os.path.exists(go):  # start line: every publisher races from the same moment
        time.sleep(0.005)
    files = ["a.txt", "sub/b.txt", "c.bin"]
    with artifacts.stage_lock(root, timeout_s=60):
        if mode == "reuse" and not artifacts.verify(root):
            print("reused")
            sys.exit(0)
        for rel in files:  # content differs per publisher, so an interleaving would show in the hashes
            storage.atomic_write_text(storage.join(root, rel), f"publisher {i} {rel} " * (100 + i))
            time.sleep(0.02)  # widen the window a second publisher would write into
        artifacts.publish(artifacts.build_manifest(root, files, kind="test", name="race", config={"i": i}), root)
    print("published")
""")


def _race(root: str, go: str, n: int, mode: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # read now: s3_server() sets the endpoint variables
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, root, go, str(i), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    time.sleep(1.0)  # let every interpreter reach the start line
    open(go, "w").close()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


# (s3, reuse) is what the eval pair above does through the real stage.
@pytest.mark.parametrize("where,mode", [("local", "reuse"), ("local", "rewrite"), ("s3", "rewrite")])
def test_processes_publishing_into_one_root_at_once(tmp_path, where, mode, fault_log):
    n = 6 if where == "local" else 4  # s3fs imports are slow on 2 cores
    go = str(tmp_path / "go")
    if where == "local":
        root = str(tmp_path / "store" / "test" / "race-0")
        outs = _race(root, go, n, mode)
        check = _check_race(root, outs, mode, n)
        leftovers = sorted(os.listdir(os.path.dirname(root)))
        assert leftovers == [".race-0.lock", "race-0"], leftovers
        assert not [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]
    else:
        with s3_server() as bucket:
            root = storage.join(bucket, "store/test/race-0")
            outs = _race(root, go, n, mode)
            check = _check_race(root, outs, mode, n)
    what = ("each waits, then reuses the first's manifest" if mode == "reuse"
            else "each rewrites the files with its own content, then publishes")
    fault_log.record("artifact", "artifacts",
                     f"{n} processes publishing into one {where} artifact root at once ({what})", check, bound="< 60 s")


def _check_race(root: str, outs: list[str], mode: str, n: int) -> str:
    m = artifacts.load_verified(root)  # raises if any file came from a different publisher than the manifest
    i = m.config["i"]
    for f in m.files:
        assert storage.read_text(storage.join(root, f.path)).startswith(f"publisher {i} {f.path} ")
    if mode == "reuse":
        assert sorted(outs) == ["published"] + ["reused"] * (n - 1), outs
        return f"1 published, {n - 1} reused; the manifest verifies and every file is the publisher's"
    assert outs == ["published"] * n, outs
    return f"all {n} published one after another; the last manifest verifies and every file is its publisher's"


def test_stage_lock_wait_is_bounded_and_a_killed_holder_releases_it(tmp_path, fault_log):
    root = str(tmp_path / "store" / "checkpoint" / "x-0")
    with artifacts.stage_lock(root):
        t0 = time.monotonic()
        with pytest.raises(artifacts.StageBusy, match="still holds"):
            with artifacts.stage_lock(root, timeout_s=0.5):
                pass
        assert time.monotonic() - t0 < 5
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from slip_core import artifacts
        with artifacts.stage_lock({root!r}):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(artifacts.StageBusy):
            with artifacts.stage_lock(root, timeout_s=0.3):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        t0 = time.monotonic()
        with artifacts.stage_lock(root, timeout_s=5):
            pass
        assert time.monotonic() - t0 < 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    fault_log.record("artifact", "artifacts", "stage lock held by another run; its holder SIGKILLed",
                     "a waiter with a deadline gets StageBusy at the deadline; after the SIGKILL the next run "
                     "takes the lock at once (the kernel drops it with the process)", bound="< 5 s")
