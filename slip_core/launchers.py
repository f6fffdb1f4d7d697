"""Where a training job runs: one registry of launcher specs (torchtitan style), chosen by a `launcher` config.

A *job* is "run `python -m MODULE ARGS` as `nproc` ranks on each node" (`TrainerJob`): the trainer
(slip_core.trainer) or the fine-tune (evaluation.finetune), both of which read RANK / WORLD_SIZE / LOCAL_RANK
from the environment, write everything into their run folder and resume from its checkpoints/latest. A
launcher only decides how the ranks are started and waited for, so the run folder, resume and the stage's
identity do not depend on it; only the world size it yields does (`world_size`).

  local     torchrun --standalone on this machine (subprocess, timeout, log lines forwarded) — the default
  slurm     a SLURM job through submitit, one task per GPU (the layout of infra/slurm_train.sbatch: every
            task IS a trainer rank, so `--signal=USR1@120` reaches the trainer, which checkpoints and exits
            143; the job then requeues itself). `cluster: local` runs the same job with submitit's
            LocalExecutor on this machine (tests, a workstation).
  work-pool a Prefect deployment on a work pool (registered by flows/launch_pool.py: it needs Prefect)

Settings are typed dataclasses (`LauncherSpec.settings`); `resolve_launcher({"kind": ..., **settings})` is
the one place a config becomes (spec, settings), with a one-line ConfigError for an unknown kind or field.
The SLURM options are written once (`slurm_options`): submitit's parameters and infra/slurm_train.sbatch's
`#SBATCH` header are both rendered from them (`python -m slip_core.launchers sbatch` prints the header).
This module is free of Prefect and imports neither torch nor submitit until a job is launched.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from slip_core.config import ConfigError, from_dict
from slip_core.launch import TrainProcessError, run_logged

Log = Callable[[str], None]
EXIT_PREEMPTED = 143  # slip_core.preemption.EXIT_PREEMPTED (not imported: that module imports torch)


@dataclass(frozen=True)
class TrainerJob:
    """`python -m module *args` on `nproc` ranks per node, with `env` added; `log_dir`: the launcher's own files."""
    module: str
    args: tuple[str, ...]
    log_dir: str
    nproc: int = 1
    env: dict = field(default_factory=dict)
    name: str = "slip-train"


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class LauncherSpec:
    name: str
    settings: type  # a dataclass; its fields are the launcher's config keys
    launch: Callable[[TrainerJob, Any, float | None, Log], None]  # returns when the job succeeded, else raises
    world_size: Callable[[Any, int], int]  # (settings, nproc per node) -> ranks in all
    help: str = ""


LAUNCHERS: dict[str, LauncherSpec] = {}
DEFAULT_LAUNCHER = "local"


def register_launcher(spec: LauncherSpec) -> LauncherSpec:
    LAUNCHERS[spec.name] = spec
    return spec


def resolve_launcher(config: dict | None) -> tuple[LauncherSpec, Any]:
    """{"kind": NAME, **settings} (None or {}: local) -> (spec, typed settings); ConfigError if bad."""
    config = dict(config or {})
    kind = config.pop("kind", DEFAULT_LAUNCHER)
    if kind not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {kind!r}; known: {', '.join(sorted(LAUNCHERS))}"
                          + ("" if "work-pool" in LAUNCHERS else " (work-pool: with flows.launch_pool)"))
    spec = LAUNCHERS[kind]
    settings = from_dict(spec.settings, config)
    check = getattr(settings, "check", None)
    if check:
        check()
    return spec, settings


def launch(job: TrainerJob, config: dict | None, timeout_s: float | None, log: Log) -> None:
    spec, settings = resolve_launcher(config)
    spec.launch(job, settings, timeout_s, log)


def world_size(config: dict | None, nproc: int) -> int:
    spec, settings = resolve_launcher(config)
    return spec.world_size(settings, nproc)


def torchrun_module_command(module: str, args, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


# ------------------------------------------------------------------------------------------ local
@dataclass
class LocalSettings:
    """torchrun --standalone on this machine (no settings)."""


def launch_local(job: TrainerJob, settings: LocalSettings, timeout_s: float | None, log: Log) -> None:
    cmd = torchrun_module_command(job.module, job.args, job.nproc)
    log(f"launching: {' '.join(cmd)} (timeout {timeout_s or 0:.0f}s)")
    run_logged(cmd, log, timeout_s=timeout_s, env={**os.environ, **job.env})


register_launcher(LauncherSpec("local", LocalSettings, launch_local, lambda s, nproc: nproc,
                               "torchrun --standalone on this machine"))


# ------------------------------------------------------------------------------------------ slurm
@dataclass
class SlurmSettings:
    """One SLURM job, `nodes` × nproc tasks (one per GPU), through submitit. `time`: SLURM's time limit
    (`HH:MM:SS` or `D-HH:MM:SS`); `signal`: the pre-emption warning sent to every task before it."""
    nodes: int = 1
    partition: str | None = None
    account: str | None = None
    time: str = "48:00:00"
    gpus_per_node: int | None = None  # None: one per task (nproc); 0 on CPU-only partitions
    cpus_per_task: int = 10
    mem: str = "0"
    signal: str = "USR1@120"
    requeue: bool = True
    job_name: str = "slip-pretrain"
    cluster: Literal["slurm", "local"] = "slurm"  # local: submitit's LocalExecutor here (one node)
    folder: str | None = None  # submitit's job folder (logs, pickles); None: <run folder>/submitit
    python: str | None = None  # the interpreter on the nodes; None: this one
    poll_s: float = 1.0
    max_requeues: int = 3  # cluster local: resubmissions after a stop at a checkpoint (SLURM: --requeue)

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"launcher slurm: nodes must be >= 1, got {self.nodes}")
        if self.cluster == "slurm" and not self.partition:
            raise ConfigError("launcher slurm: missing partition (--launcher-set partition=NAME)")
        if self.cluster == "local" and self.nodes != 1:
            raise ConfigError(f"launcher slurm, cluster local: one node only, got nodes={self.nodes}")


# The layout of infra/slurm_train.sbatch (the paper's 8 nodes × 8 GPUs); its #SBATCH header is rendered from it.
PAPER_SLURM = SlurmSettings(nodes=8)
PAPER_NPROC = 8


def slurm_options(s: SlurmSettings, nproc: int) -> dict[str, Any]:
    """sbatch option -> value (True: a flag): the one place the job's SLURM request is written."""
    opts: dict[str, Any] = {"job-name": s.job_name, "nodes": s.nodes, "ntasks-per-node": nproc,
                            "gpus-per-node": nproc if s.gpus_per_node is None else s.gpus_per_node,
                            "cpus-per-task": s.cpus_per_task, "mem": s.mem, "time": s.time,
                            "partition": s.partition, "account": s.account,
                            "requeue": True if s.requeue else None, "signal": s.signal}
    if not opts["gpus-per-node"]:
        opts.pop("gpus-per-node")
    return {k: v for k, v in opts.items() if v is not None}


def sbatch_header(s: SlurmSettings = PAPER_SLURM, nproc: int = PAPER_NPROC) -> list[str]:
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in slurm_options(s, nproc).items()]


def submitit_parameters(s: SlurmSettings, nproc: int, setup: list[str]) -> dict[str, Any]:
    """submitit.SlurmExecutor.update_parameters(...) for the same request (signal and requeue passed as
    sbatch options: submitit's own pre-emption signal is USR2 to its Python wrapper; ours goes to the ranks)."""
    opts = slurm_options(s, nproc)
    extra = {k: opts.pop(k) for k in ("signal", "requeue") if k in opts}
    params = {k.replace("-", "_"): v for k, v in opts.items()}
    return {**params, "setup": setup, "stderr_to_stdout": True, "additional_parameters": extra,
            "srun_args": ["--kill-on-bad-exit=0", "--cpu-bind=none"]}


@dataclass(frozen=True)
class RankTask:
    """The function submitit runs in every task: become rank SLURM_PROCID of the job and run the module's
    main() in this process (so the pre-emption signal reaches the trainer itself). Exit 143 (stopped at a
    checkpoint) requeues the job on SLURM, as infra/slurm_train.sbatch does; on the local cluster it is the
    task's result and launch_slurm resubmits the job."""
    job: TrainerJob
    master_port: int | None = None  # None: derived from the job id (all nodes agree on it)
    on_slurm: bool = True
    requeue: bool = True  # on SLURM: `scontrol requeue` after a stop at a checkpoint (else: resubmitted by us)

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        port = self.master_port or 20000 + int(str(env.job_id).split("_")[0]) % 20000
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          LOCAL_WORLD_SIZE=str(self.job.nproc), MASTER_PORT=str(port),
                          MASTER_ADDR=env.hostnames[0] if self.on_slurm else "127.0.0.1")
        rc = importlib.import_module(self.job.module).main(list(self.job.args))
        if rc == EXIT_PREEMPTED and self.on_slurm and self.requeue:
            if env.global_rank == 0:
                import subprocess

                print(f"slip: stopped at a checkpoint (exit 143); requeueing job {env.job_id}", flush=True)
                subprocess.run(["scontrol", "requeue", str(env.job_id)], check=False)
            raise SystemExit(rc)  # no result file: submitit keeps waiting for the requeued job
        if rc not in (0, EXIT_PREEMPTED):
            raise TrainProcessError(f"{self.job.module} rank {env.global_rank} exited with code {rc}", rc, [])
        return rc  # 143 here (local cluster, no requeue): launch_slurm resubmits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_executor(job: TrainerJob, s: SlurmSettings, timeout_s: float | None):
    """(submitit executor, RankTask) for this job: SLURM, or submitit's LocalExecutor for `cluster: local`."""
    import shlex

    import submitit

    folder = s.folder or os.path.join(job.log_dir, "submitit")
    env = dict(job.env)
    if s.cluster == "slurm":  # intra-op threads as infra/slurm_train.sbatch: the caller's, else 1 (not this host's count)
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    setup = [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items())]
    if s.cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, python=s.python)
        ex.update_parameters(tasks_per_node=job.nproc, nodes=1, stderr_to_stdout=True, setup=setup,
                             timeout_min=(timeout_s or 14 * 86400.0) / 60 + 1, signal_delay_s=120)
        return ex, RankTask(job, master_port=free_port(), on_slurm=False)
    ex = submitit.SlurmExecutor(folder=folder, python=s.python)
    ex.update_parameters(**submitit_parameters(s, job.nproc, setup))
    return ex, RankTask(job, on_slurm=True, requeue=s.requeue)


def launch_slurm(job: TrainerJob, s: SlurmSettings, timeout_s: float | None, log: Log) -> None:
    """Submit, forward rank 0's log lines while waiting, raise TrainProcessError unless the job succeeded.
    A job whose ranks stopped at a checkpoint (exit 143: pre-emption warning, SIGTERM) requeues itself on
    SLURM; on the local cluster it is resubmitted here (at most `max_requeues` times), so both resume from
    the run folder's checkpoints/latest. Past `timeout_s` (or on any exception here, e.g. the flow being
    cancelled) the job is cancelled."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    for attempt in range(s.max_requeues + 1):
        left = deadline - time.monotonic() if deadline else None
        codes = submit_and_wait(job, s, left, log)
        if EXIT_PREEMPTED not in codes:
            return
        if attempt < s.max_requeues:
            log(f"job stopped at a checkpoint (exit {EXIT_PREEMPTED}); resubmitting ({attempt + 1}/{s.max_requeues})")
    raise TrainProcessError(f"{s.cluster} job stopped at a checkpoint {s.max_requeues + 1} times; not resubmitted "
                            "again (max_requeues)", EXIT_PREEMPTED, [])


def submit_and_wait(job: TrainerJob, s: SlurmSettings, timeout_s: float | None, log: Log) -> list[int]:
    """One submission: every task's exit code (0, or 143 on the local cluster), else TrainProcessError."""
    ex, task = slurm_executor(job, s, timeout_s)
    sub = ex.submit(task)
    log(f"submitted {s.cluster} job {sub.job_id} ({job.nproc} task(s)/node x {s.nodes} node(s)); "
        f"log: {sub.paths.stdout}")
    deadline = time.monotonic() + timeout_s if timeout_s else None
    tail: list[str] = []
    offset, ok = 0, False

    def forward() -> None:
        nonlocal offset, tail
        path = str(sub.paths.stdout).replace("%t", "0")
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only; the rest next time
        offset += end
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            tail = (tail + [line])[-200:]
            log(line)

    try:
        while not sub.done():
            forward()
            if deadline and time.monotonic() > deadline:
                raise TrainProcessError(f"{s.cluster} job {sub.job_id} timed out after {timeout_s:.0f}s (cancelled)",
                                        None, tail)
            time.sleep(s.poll_s)
        forward()
        try:
            codes = sub.results()  # every task's (a job of several tasks has no single result)
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError carry the job's traceback
            raise TrainProcessError(f"{s.cluster} job {sub.job_id} failed: {str(e).strip().splitlines()[-1]}",
                                    None, tail) from e
        ok = True
        return list(codes)
    finally:
        if not ok and not sub.done():
            sub.cancel(check=False)
            log(f"cancelled {s.cluster} job {sub.job_id}")


register_launcher(LauncherSpec("slurm", SlurmSettings, launch_slurm, lambda s, nproc: s.nodes * nproc,
                               "a SLURM job through submitit (cluster: local = submitit's LocalExecutor)"))


if __name__ == "__main__":  # python -m slip_core.launchers sbatch: the #SBATCH header of infra/slurm_train.sbatch
    if sys.argv[1:] != ["sbatch"]:
        sys.exit("usage: python -m slip_core.launchers sbatch")
    print("\n".join(sbatch_header()))
