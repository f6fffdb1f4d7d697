"""Launchers (issue 17, item 2): the pretrain flow submits its training through submitit (SLURM's job layout,
run by submitit's LocalExecutor here) or a Prefect process work pool (a real worker), waits, forwards the job's
log lines to the flow's logger, and publishes the same checkpoint artifact with the same lineage and identity as
a local torchrun run of the same world size. Bad launcher settings exit 2 with one line. The SLURM request is
written once: infra/slurm_train.sbatch's #SBATCH header and submitit's sbatch file both come from it."""
from __future__ import annotations

import logging
import os
import re
import sys
import time

import pytest
import torch

from slip_core import artifacts, launchers, procs, progress
from slip_core.checkpoint import load_state
from tests._stage_runs import TRAIN_SETS
from tests._train_util import fashion_samples, write_dataset

pytestmark = pytest.mark.prefect
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPROC = 2  # gloo ranks: the job's rank environment and rendezvous are exercised, not only one process


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("launchds")), fashion_samples(64, seed=7), per_shard=32)


@pytest.fixture(scope="module")
def local_run(ds, tmp_path_factory, prefect_server):
    """The reference: the same training through the default (local torchrun) launcher; (url, seconds)."""
    from flows.pretrain import pretrain

    store = str(tmp_path_factory.mktemp("local") / "store")
    t0 = time.time()
    url = pretrain(dataset=ds, store=store, config=TRAIN_SETS, preset="tiny", nproc=NPROC, retries=0)
    return url, time.time() - t0


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def flow_lines():
    """Every line the flow's task logged through Prefect's run logger."""
    h = Lines()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(h)
    yield h.lines
    logger.removeHandler(h)


def assert_same_artifact(url: str, ref: str) -> None:
    m, r = artifacts.load_verified(url), artifacts.load_verified(ref)
    assert artifacts.artifact_root(url).rsplit("/", 1)[-1] == artifacts.artifact_root(ref).rsplit("/", 1)[-1]
    assert m.identity == r.identity and m.config == r.config and m.config["nproc"] == NPROC
    assert m.upstream["dataset"] == r.upstream["dataset"] and set(m.upstream) == set(r.upstream) == {"dataset"}
    assert {f.path for f in m.files} == {f.path for f in r.files}
    assert m.metrics["steps"] == r.metrics["steps"] == 2 and m.metrics["world_size"] == NPROC
    got = load_state(os.path.join(artifacts.artifact_root(url), "checkpoint.pt"))["state_dict"]
    want = load_state(os.path.join(artifacts.artifact_root(ref), "checkpoint.pt"))["state_dict"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # same ranks, same run
    assert not os.path.exists(os.path.join(artifacts.artifact_root(url), "run"))  # job folder cleaned up


def test_submitit_job_publishes_the_same_artifact_as_a_local_run(ds, local_run, tmp_path, flow_lines):
    from flows.pretrain import explain, pretrain

    store = str(tmp_path / "store")
    launcher = {"kind": "slurm", "cluster": "local", "poll_s": 0.5}
    assert explain(ds, str(tmp_path / "store"), TRAIN_SETS, "tiny", NPROC, launcher).startswith("will run")
    t0 = time.time()
    url = pretrain(dataset=ds, store=store, config=TRAIN_SETS, preset="tiny", nproc=NPROC, retries=0,
                   launcher=launcher)
    took = time.time() - t0
    assert_same_artifact(url, local_run[0])
    assert any(re.match(r"submitted local job \d+ \(2 task\(s\)/node x 1 node\(s\)\); log: .*_0_log.out", ln)
               for ln in flow_lines)
    assert any((progress.parse_step_line(ln) or (0,))[0] == 2 for ln in flow_lines), flow_lines[-20:]  # the job's log
    # the identity does not depend on the launcher: the local launcher finds this run's artifact complete
    assert explain(ds, store, TRAIN_SETS, "tiny", NPROC).startswith("cached")
    print(f"\nsubmit->publish: submitit local {took:.1f}s, local torchrun {local_run[1]:.1f}s")


def test_failed_submitit_job_is_one_error_with_its_output(ds, tmp_path):
    from slip_core.launch import TrainProcessError

    job = launchers.TrainerJob("slip_core.trainer", ("--dataset", ds, "--out", str(tmp_path / "run"),
                                                     "--set", "no_such_field=1"), log_dir=str(tmp_path), nproc=1)
    lines: list[str] = []
    with pytest.raises(TrainProcessError, match=r"local job \d+ failed") as e:
        launchers.launch(job, {"kind": "slurm", "cluster": "local", "poll_s": 0.2}, 120, lines.append)
    assert "no_such_field" in str(e.value)


def test_work_pool_run_publishes_the_same_artifact_as_a_local_run(ds, local_run, tmp_path, prefect_server, flow_lines):
    from flows.pretrain import pretrain

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    worker = procs.spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", "slip-launch-test",
                          "--type", "process"], env=env, cwd=REPO, stdout=open(tmp_path / "worker.log", "w"),
                         stderr=-2)
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # the worker creates its pool
            for _ in range(600):
                try:
                    client.read_work_pool("slip-launch-test")
                    break
                except Exception:
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(0.2)
        t0 = time.time()
        url = pretrain(dataset=ds, store=str(tmp_path / "store"), config=TRAIN_SETS, preset="tiny", nproc=NPROC,
                       retries=0, launcher={"kind": "work-pool", "pool": "slip-launch-test", "repo": REPO,
                                            "poll_s": 0.5})
        took = time.time() - t0
    finally:
        procs.terminate(worker, grace_s=20)
    assert_same_artifact(url, local_run[0])
    assert any(re.search(r"submitted flow run \S+ \(\S+\) of trainer-job/slip-train on work pool slip-launch-test "
                         r"\(process\); logs: .*/runs/flow-run/", ln) for ln in flow_lines)
    assert any("launching:" in ln and "torch.distributed.run" in ln for ln in flow_lines)  # the run's own lines
    print(f"\nsubmit->publish: work pool {took:.1f}s, local torchrun {local_run[1]:.1f}s")


@pytest.mark.parametrize("sets, message", [
    (["--launcher", "nope"], "unknown launcher 'nope'; known: local, slurm, work-pool"),
    (["--launcher", "slurm"], "launcher slurm: missing partition"),
    (["--launcher", "slurm", "--launcher-set", "partition=gpu", "--launcher-set", "nodez=2"], "unknown field(s) ['nodez']"),
    (["--launcher", "slurm", "--launcher-set", "cluster=local", "--launcher-set", "nodes=2"], "one node only"),
])
def test_bad_launcher_settings_exit_2_with_one_line(sets, message, ds, tmp_path, capsys, prefect_server):
    from flows import cli

    assert cli.main(["train", "--dataset", ds, "--store", str(tmp_path), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_sbatch_header_and_submitit_request_come_from_one_place(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    with open(os.path.join(REPO, "infra", "slurm_train.sbatch")) as f:
        header = [ln.strip() for ln in f if ln.startswith("#SBATCH")]
    assert header == launchers.sbatch_header() + ["#SBATCH --output=slip-%j.out"]
    s = launchers.SlurmSettings(nodes=8, partition="gpu", account="proj")
    sbatch = _make_sbatch_string(command="python -m submitit.core._submit F", folder=str(tmp_path),
                                 **launchers.submitit_parameters(s, 8, ["export OMP_NUM_THREADS=1"])).splitlines()
    assert set(launchers.sbatch_header(s, 8)) <= set(sbatch)
    assert {"#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
            "#SBATCH --ntasks-per-node=8", "export OMP_NUM_THREADS=1"} <= set(sbatch)
    assert not any("USR2" in ln for ln in sbatch)  # the warning goes to the ranks, not submitit's own handler
    assert launchers.world_size({"kind": "slurm", "nodes": 8, "partition": "gpu"}, 8) == 64
    assert launchers.world_size(None, 8) == 8


def test_finetune_through_submitit_equals_the_local_launch(tmp_path):
    """The fine-tune (evaluation.finetune) goes through the same registry: a submitit job gives the local result."""
    import dataclasses
    import json

    from datasets import catalog
    from evaluation import finetune
    from tests._eval_util import random_checkpoint

    ck = random_checkpoint()  # the launch path is what is compared, not what the backbone learnt
    catalog.ensure("digits")
    cfg = dataclasses.replace(finetune.FINETUNE_PRESETS["tiny"], epochs=1, max_train_samples=64, max_test_samples=50,
                              batch_size=32, crop_scale=(1.0, 1.0), color_jitter=None, threads=1)
    out, res = {}, {}
    for kind, launcher in (("local", None), ("slurm", {"kind": "slurm", "cluster": "local", "poll_s": 0.5})):
        out[kind] = str(tmp_path / kind)
        lines: list[str] = []
        res[kind] = finetune.launch(ck, out[kind], cfg, nproc=1, timeout_s=600, log=lines.append, launcher=launcher)
        assert any('"step": 2' in ln for ln in lines), lines[-10:]
    assert res["slurm"]["value"] == res["local"]["value"] and res["slurm"]["world_size"] == 1
    a, b = (load_state(os.path.join(out[k], "checkpoint.pt"))["state_dict"] for k in ("local", "slurm"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(open(os.path.join(out["slurm"], "result.json")).read())["epochs"] == 1


def test_submitit_job_past_its_timeout_is_cancelled(ds, tmp_path):
    from slip_core.launch import TrainProcessError

    job = launchers.TrainerJob("slip_core.trainer", ("--dataset", ds, "--out", str(tmp_path / "run")),
                               log_dir=str(tmp_path), nproc=1)
    lines: list[str] = []
    with pytest.raises(TrainProcessError, match=r"local job (\d+) timed out after 1s \(cancelled\)") as e:
        launchers.launch(job, {"kind": "slurm", "cluster": "local", "poll_s": 0.2}, 1, lines.append)
    controller = int(re.search(r"job (\d+)", str(e.value)).group(1))  # the local executor's job id is its pid
    deadline = time.time() + 30
    while procs.pid_alive(controller) and time.time() < deadline:
        time.sleep(0.2)
    assert not procs.pid_alive(controller) and lines[-1].startswith("cancelled local job")


def test_kubernetes_pool_job_variables_rendered_from_the_launcher_settings():
    from flows.launch_pool import WorkPoolSettings, job_variables_for
    from slip_core.config import ConfigError

    job = launchers.TrainerJob("slip_core.trainer", ("--out", "s3://b/run"), log_dir="s3://b/run", nproc=8,
                               env={"OMP_NUM_THREADS": "8"})
    s = WorkPoolSettings(pool="slip-k8s", image="registry.example.com/slip:1", job_variables={"memory_request": "900Gi"})
    v = job_variables_for("kubernetes", s, job)
    assert v == {"image": "registry.example.com/slip:1", "namespace": "slip", "gpu_count": 8, "memory_request": "900Gi",
                 "env": {"OMP_NUM_THREADS": "8", "PREFECT_LOGGING_TO_API_ENABLED": "true"}}
    assert job_variables_for("process", WorkPoolSettings(), job) == {"env": v["env"]}
    with pytest.raises(ConfigError, match="needs image"):
        job_variables_for("kubernetes", WorkPoolSettings(pool="slip-k8s"), job)


def test_preempted_submitit_job_resumes_exactly(ds, tmp_path, monkeypatch):
    """SLURM's warning (SIGUSR1 to every task of the job) mid-run: the ranks checkpoint and stop (143), the job
    is resubmitted (what --requeue does on SLURM) and resumes; the weights equal an uninterrupted run's."""
    import json
    import signal

    from flows.pretrain import make_config
    from slip_core.config import to_dict
    from slip_core.launch import trainer_args
    from slip_core.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_config("tiny", TRAIN_SETS), ds, str(tmp_path / "uninterrupted"))
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "run")
    cfg = tmp_path / "train_config.json"
    cfg.write_text(json.dumps(to_dict(make_config("tiny", TRAIN_SETS))))
    job = launchers.TrainerJob("slip_core.trainer", tuple(trainer_args(ds, out, str(cfg))), log_dir=str(tmp_path),
                               nproc=1, env={"OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    sent: list[int] = []

    def log(line: str) -> None:
        lines.append(line)
        job_id = re.search(r"submitted local job (\d+)", line)
        if job_id:
            sent.append(int(job_id.group(1)))
        if (progress.parse_step_line(line) or (0,))[0] == 1 and len(sent) == 1:  # the warning, while step 2 runs
            tasks = open(f"/proc/{sent[0]}/task/{sent[0]}/children").read().split()
            for pid in tasks:
                os.kill(int(pid), signal.SIGUSR1)
            sent.append(-len(tasks))

    launchers.launch(job, {"kind": "slurm", "cluster": "local", "poll_s": 0.1}, 600, log)
    assert sent[1] == -1 and any("resubmitting (1/3)" in ln for ln in lines), lines
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4] and 2 <= int(open(os.path.join(out, "checkpoints", "latest")).read()[5:13]) <= 4
    got = load_state(os.path.join(out, "checkpoint.pt"))["state_dict"]
    ref = load_state(str(tmp_path / "uninterrupted" / "checkpoint.pt"))["state_dict"]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_the_eval_identity_sees_the_fine_tune_world_size_not_its_launcher():
    from evaluation.tasks import EvalConfig
    from slip_core.config import to_dict

    plain = EvalConfig(finetune=["imagenet"], finetune_nproc=8)
    before = {k: v for k, v in to_dict(plain).items() if k != "finetune_launcher"}  # the settings of older runs
    assert plain.identity_settings() == before
    via_slurm = EvalConfig(finetune=["imagenet"], finetune_nproc=8, finetune_launcher={"kind": "slurm", "partition": "p"})
    assert via_slurm.identity_settings() == before
    two_nodes = EvalConfig(finetune=["imagenet"], finetune_nproc=8,
                           finetune_launcher={"kind": "slurm", "partition": "p", "nodes": 2})
    assert two_nodes.identity_settings() == {**before, "finetune_nproc": 16}
