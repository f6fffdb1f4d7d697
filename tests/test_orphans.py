"""Nothing a stage starts outlives it (issue 19.1), with one writer per run folder (19.2): real torchrun,
trainer, img2dataset, Prefect flows and a Prefect runner, killed the ways that leave orphans.

Every process of a run carries a tag in its environment (tests/_procs.py), so orphans re-parented to init
are found too. The trainer runs silent here (log_every beyond the run): a line on its stdout to a launcher
that is gone kills it with EPIPE by accident, and a silent stretch (loading, a long checkpoint, log_every
steps at paper scale) is where an orphan otherwise lives on.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from datasets.httpserve import serve_directory
from slip_core import locks
from tests._dataset_util import TEST_CONFIG, Row, write_images, write_metadata
from tests._procs import kill_tagged, short, stop_group, tag_env, tagged, wait_untagged
from tests._train_util import fashion_samples, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_S = 10.0  # every process of a killed run is gone this long after the kill
MODEL = {"image_size": 32, "vision_depth": 2, "transformer_layers": 1, "ssl_mlp_dim": 64, "ssl_emb_dim": 32}
# Long and silent: 640 steps, no log line and no periodic checkpoint before it is stopped.
SILENT = {"model_overrides": MODEL, "epochs": 160, "samples_per_epoch": 64, "batch_size": 16, "num_workers": 0,
          "log_every": 100000, "ckpt_every": 100000, "warmup_epochs": 0.5, "shuffle_chunk": 30}
LAUNCHER = textwrap.dedent("""
    import sys
    from slip_core.launch import run_logged, torchrun_command
    dataset, out, cfg = sys.argv[1:4]
    run_logged(torchrun_command(dataset, out, cfg), lambda line: print(line, flush=True))
""")


def _env(**extra) -> tuple[str, dict]:
    return tag_env({**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **extra})


def _wait_for(pred, timeout_s: float, what: str, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{open(log).read()[-3000:]}" if log else ""))
        time.sleep(0.1)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _latest_step(out: str) -> int:
    p = os.path.join(out, "checkpoints", "latest")
    return int(open(p).read().strip()[5:13]) if os.path.exists(p) else 0


FORKER = textwrap.dedent("""
    import subprocess, sys, threading, time
    from slip_core import procs
    how = sys.argv[1]
    cmd = [sys.executable, "-c", "import time; time.sleep(600)"]

    def start():  # a short-lived worker thread, like a Prefect task's
        if how == "spawn":
            child = procs.spawn(cmd)
        else:  # the naive way: the death signal armed in a child forked by this thread
            child = subprocess.Popen(cmd, preexec_fn=lambda: procs.set_parent_death_signal(15))
        print(child.pid, flush=True)

    t = threading.Thread(target=start)
    t.start()
    t.join()  # the forking thread is gone
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["spawn", "naive"])
def test_a_child_follows_the_process_not_the_thread_that_forked_it(tmp_path, how):
    tag, env = _env()
    parent = subprocess.Popen([sys.executable, "-c", FORKER, how], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.5)
        alive = [pid for pid, _ in tagged(tag)]
        if how == "naive":  # PR_SET_PDEATHSIG fired when the worker thread exited: the hazard procs.spawn avoids
            assert child not in alive
            return
        assert child in alive
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_untagged(tag, 3.0) == []
    finally:
        kill_tagged(tag)


GRANDCHILD = "import time; time.sleep(3); from slip_core import procs; procs.follow_parent(graceful=False); time.sleep(600)"
LAUNCHER_OF_GRANDCHILD = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); time.sleep(600)"


def test_a_grandchild_orphaned_before_it_watches_still_ends():
    """torchrun SIGKILLed while its rank is still importing: the rank starts watching an init it never had."""
    from slip_core import procs

    tag, env = _env()
    child = procs.spawn([sys.executable, "-c", LAUNCHER_OF_GRANDCHILD], env=env)
    try:
        _wait_for(lambda: len(tagged(tag)) >= 2, 60, "the grandchild")
        os.kill(child.pid, signal.SIGKILL)  # the grandchild is still in its sleep, not watching yet
        child.wait()  # reaped without procs.wait's sweep of its group: only the grandchild's own check acts
        assert wait_untagged(tag, 10.0) == []
    finally:
        kill_tagged(tag)


POOL = textwrap.dedent("""
    import concurrent.futures, functools, multiprocessing, os, sys, time
    from slip_core import procs
    init = functools.partial(procs.follow_parent, graceful=False, parent=os.getpid()) if sys.argv[1] == "follow" else None
    ctx = multiprocessing.get_context("fork")  # as datasets/quality/fingerprint.py's hashing pool
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=init) as pool:
        print("started", flush=True)
        list(pool.map(time.sleep, [600, 600]))
""")


@pytest.mark.parametrize("how", ["follow", "plain"])
def test_forked_pool_workers_end_with_their_parent(how):
    tag, env = _env()
    parent = subprocess.Popen([sys.executable, "-c", POOL, how], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        _wait_for(lambda: len(tagged(tag)) >= 3, 60, "the pool workers")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        left = wait_untagged(tag, 3.0)
        if how == "plain":  # the hazard: a forked worker holds its queue's write end and never sees EOF
            assert len(left) == 2
        else:
            assert left == []
    finally:
        kill_tagged(tag)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("orph") / "dataset"), fashion_samples(64, seed=3), per_shard=32)


def _launch_silent(dataset: str, tmp_path, config: dict | None = None) -> tuple[subprocess.Popen, str, str, str]:
    out, cfg, log = str(tmp_path / "run"), str(tmp_path / "train.json"), str(tmp_path / "launcher.log")
    with open(cfg, "w") as f:
        json.dump(config or SILENT, f)
    tag, env = _env()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, dataset, out, cfg], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(lambda: "training SLIP_VIT_TINY" in open(log).read(), 180, "the trainer to start", log)
    time.sleep(3.0)  # a few silent steps
    return proc, tag, out, log


@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_trainer_ends_and_checkpoints_when_its_launcher_or_torchrun_is_killed(dataset, tmp_path, victim, fault_log):
    """SIGKILL the process running launch.run_logged (torchrun's parent), or torchrun itself (the ranks' parent)."""
    proc, tag, out, log = _launch_silent(dataset, tmp_path)
    try:
        target = proc.pid if victim == "launcher" else next(
            pid for pid, cmd in tagged(tag) if "torch.distributed.run" in cmd)
        os.kill(target, signal.SIGKILL)
        left = wait_untagged(tag, BOUND_S) if victim == "launcher" else [
            (p, c) for p, c in wait_untagged(tag, BOUND_S) if p != proc.pid]
        assert left == [], [(p, short(c)) for p, c in left]
        step = _latest_step(out)
        assert step > 0, "no checkpoint: the trainer did not stop gracefully"
        if victim == "torchrun":  # the launcher sees torchrun fail and raises
            assert proc.wait(timeout=30) != 0
            assert "training exited with code" in open(log).read()
    finally:
        kill_tagged(tag)
    what = "the process running torchrun (launch.run_logged)" if victim == "launcher" else "torchrun itself"
    how = ("torchrun gets SIGTERM (parent-death signal) and forwards it" if victim == "launcher"
           else "the rank's parent watchdog sends it SIGTERM")
    fault_log.record("kill", "train", f"SIGKILL of {what} while the trainer runs silent (no log line, no periodic "
                     "checkpoint due)",
                     f"{how}; the trainer checkpoints at the step boundary and exits; no process of the run alive "
                     f"{BOUND_S:.0f} s after the kill", bound=f"< {BOUND_S:.0f} s")


def test_one_trainer_per_run_folder_and_it_stops_when_the_folder_goes(dataset, tmp_path, fault_log):
    """A second trainer on a live run folder refuses naming the first; the first stops at once when its folder
    is published by someone else or removed, and writes nothing afterwards."""
    proc, tag, out, log = _launch_silent(dataset, tmp_path)
    try:
        tag2, env2 = _env()
        second = subprocess.run([sys.executable, "-m", "slip_core.trainer", "--dataset", dataset, "--out", out,
                                 "--config-json", str(tmp_path / "train.json"), "--lease-wait", "1"],
                                env=env2, capture_output=True, text=True, timeout=180)
        holder = next(pid for pid, cmd in tagged(tag) if "slip_core.trainer" in cmd and "distributed.run" not in cmd)
        err = second.stderr.strip().splitlines()[-1]
        assert second.returncode == 1 and f"is being written by trainer: host {locks.HOST}, pid {holder}" in err, second.stderr
        import shutil

        shutil.rmtree(out)
        assert proc.wait(timeout=30) != 0
        assert not os.path.exists(out)  # nothing written after the folder was removed
        assert "was removed" in open(log).read()
        assert wait_untagged(tag, BOUND_S) == []
    finally:
        kill_tagged(tag)
    fault_log.record("artifact", "train", "a second trainer started on a run folder a live trainer is writing; then the "
                     "folder removed under the first",
                     "the second exits 1 with one line naming the first's host and pid; the first stops at its next "
                     "step without recreating the folder (lease lost), and its torchrun exits", bound="< 30 s")


def test_trainer_stops_when_its_artifact_is_published_by_another_run(dataset, tmp_path):
    out, cfg = str(tmp_path / "run"), str(tmp_path / "train.json")
    with open(cfg, "w") as f:
        json.dump(SILENT, f)
    published = str(tmp_path / "artifact" / "manifest.json")
    tag, env = _env()
    proc = subprocess.Popen([sys.executable, "-m", "slip_core.trainer", "--dataset", dataset, "--out", out,
                             "--config-json", cfg, "--published", published], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(out, locks.LOCK_NAME)), 180, "the trainer's lease")
        time.sleep(3.0)
        os.makedirs(os.path.dirname(published))
        open(published, "w").close()
        text, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "published by another run" in text, text[-2000:]
        assert not os.path.exists(os.path.join(out, "checkpoints")) and not os.path.exists(os.path.join(out, "checkpoint.pt"))
    finally:
        kill_tagged(tag)


# ----------------------------------------------------------------------------------------- datasets
SLOW_S = 3.0
DS_CONF = {**TEST_CONFIG, "name": "orphans", "timeout": 10, "download_deadline_s": 20.0, "thread_count": 2,
           "number_sample_per_shard": 8}


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """12 rows whose images take SLOW_S each: the download lasts ~20 s, long enough to be killed inside."""
    d = tmp_path_factory.mktemp("slow")
    img_dir = str(d / "images")
    write_images(img_dir, n_photos=1, n_fashion=1)
    hits = collections.Counter()
    with serve_directory(img_dir, faults=True, hits=hits) as base:
        rows = [Row(f"{base}/_fault/sleep/{SLOW_S}?r={i}", f"a slow photo {i}") for i in range(12)]
        yield {"d": d, "corpus": write_metadata(str(d / "meta"), str(d / "subset.tsv"), rows), "hits": hits}


def _stats_files(store: str) -> list[str]:
    return glob.glob(os.path.join(store, "dataset-work", "*", "attempts", "*", "*", "out", "*_stats.json"))


@pytest.mark.parametrize("how", ["SIGKILL of `python -m datasets.pipeline`", "SIGTERM of `slip dataset build`"])
def test_download_stops_with_the_stage_that_started_it(prefect_server, slow_corpus, tmp_path, how, fault_log):
    c, store = slow_corpus["corpus"], str(tmp_path / "store")
    if how.startswith("SIGKILL"):
        cmd = [sys.executable, "-m", "datasets.pipeline", c.metadata, store, "--subset", c.subset, "--preset", "tiny",
               "--config", json.dumps(DS_CONF)]
    else:
        cmd = [sys.executable, "-m", "flows.cli", "dataset", "build", c.metadata, "--store", store, "--subset", c.subset,
               "--preset", "tiny", *[f"--set={k}={json.dumps(v)}" for k, v in DS_CONF.items()]]
    tag, env = _env(PREFECT_API_URL=prefect_server)
    hits0 = sum(slow_corpus["hits"].values())
    log = str(tmp_path / "stage.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: sum(slow_corpus["hits"].values()) > hits0, 180, "the first image request", log)
        proc.send_signal(signal.SIGKILL if how.startswith("SIGKILL") else signal.SIGTERM)
        t0 = time.monotonic()
        left = wait_untagged(tag, BOUND_S)
        assert left == [], ([(p, short(c)) for p, c in left], open(log).read()[-3000:])
        assert proc.wait(timeout=5) != 0 and time.monotonic() - t0 <= BOUND_S
        time.sleep(2 * SLOW_S)  # a surviving worker would have finished its shard by now
        assert _stats_files(store) == []  # nothing of the killed download landed in the work folder
    finally:
        kill_tagged(tag)
    fault_log.record("kill", "download", f"{how} while img2dataset downloads (slow server, no shard complete)",
                     f"img2dataset and its pool worker end with it (parent-death signal, group kill); the stage "
                     f"process itself is gone within {BOUND_S:.0f} s; no shard of the killed download is completed "
                     "afterwards", bound=f"< {BOUND_S:.0f} s")


# ------------------------------------------------------------------------------------ Prefect cancel
SERVE = textwrap.dedent("""
    from flows.pretrain import pretrain
    pretrain.serve(name="cancel-me", limit=1)
""")


def test_prefect_cancellation_of_a_flow_run_stops_its_trainer(prefect_server, dataset, tmp_path, fault_log):
    """A served pretrain flow run, cancelled through the API while training: its processes end, it is Cancelled,
    and the trainer checkpointed at the step boundary on the way out."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import State

    store = str(tmp_path / "store")
    tag, env = _env(PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = str(tmp_path / "runner.log")
    with open(log, "w") as f:
        runner = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                run = run_deployment("pretrain/cancel-me", timeout=0, parameters={
                    "dataset": dataset, "store": store, "config": SILENT, "preset": "tiny", "retries": 0})
                break
            except Exception:  # noqa: BLE001 - the deployment is not registered yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        # the flow runs the trainer as evaluation.train_entry (slip_core.trainer + in-training evaluation)
        _wait_for(lambda: any("evaluation.train_entry" in cmd for _, cmd in tagged(tag)), 240, "the trainer", log)
        _wait_for(lambda: "training SLIP_VIT_TINY" in open(log).read(), 120, "training", log)
        time.sleep(3.0)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, State(type=StateType.CANCELLING))
            _wait_for(lambda: client.read_flow_run(run.id).state.type == StateType.CANCELLED, 120,
                      "the flow run to be Cancelled", log)
        # The runner and its own helpers (its direct children now: the flow-run process itself has exited, and
        # what that process started would have been re-parented away from the runner) are not the flow run's.
        left = [(p, c) for p, c in wait_untagged(tag, BOUND_S) if runner.pid not in (p, _ppid(p))]
        assert left == [], [(p, short(c)) for p, c in left]
        runs = glob.glob(os.path.join(store, "checkpoint", "*", "run"))
        assert runs and _latest_step(runs[0]) > 0, "the trainer did not checkpoint on its way out"
    finally:
        stop_group(runner, grace_s=10)
        kill_tagged(tag)
    fault_log.record("kill", "train", "Prefect cancellation (API: state Cancelling) of a served pretrain flow run while "
                     "it trains", "the runner's SIGTERM reaches torchrun and the trainer through the flow process; the "
                     "trainer checkpoints at the step boundary; the run ends Cancelled and none of its processes "
                     f"is alive {BOUND_S:.0f} s later", bound="< 120 s")
