"""The `work-pool` launcher: the training job runs as a Prefect deployment on a work pool (slip_core/launchers.py
registry; here because it needs Prefect).

`launch` registers (or updates) the deployment `trainer-job/<deployment>` of the `trainer_job` flow below on
the pool, starts a flow run of it with the job (module, arguments, ranks per node, environment) as
parameters, forwards that run's log lines to the caller while it runs (and logs the run's UI link), and
raises unless it completed; past `timeout_s`, or when the caller fails, the run is cancelled. A worker of the
pool runs `trainer_job`, which is the `local` launcher (torchrun on the worker's machine), so the run folder,
resume and identity are those of a local run. The run folder must be storage the worker can reach (the
store is shared storage whenever flow runs land on other machines).

Pools: `process` (a worker with this repository, `prefect worker start --pool slip-process`): job variables
`env`. `kubernetes` with infra/k8s_gpu_job_template.py's base job template: the same settings render `image`,
`namespace`, `gpu_count` (= ranks per node: one GPU per rank) and `env` (`job_variables_for`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from slip_core.config import ConfigError
from slip_core.launch import TrainProcessError
from slip_core.launchers import LauncherSpec, LocalSettings, Log, TrainerJob, launch_local, register_launcher

FLOW_NAME = "trainer-job"
ENTRYPOINT = "flows/launch_pool.py:trainer_job"


@dataclass
class WorkPoolSettings:
    """`repo`: the repository on the worker's machine (process pools; None: this checkout); `image` and
    `namespace`: for kubernetes pools (the repository is /opt/slip-pipeline in the image)."""
    pool: str = "slip-process"
    deployment: str = "slip-train"
    repo: str | None = None
    image: str | None = None
    namespace: str = "slip"
    job_variables: dict = field(default_factory=dict)  # more, over the rendered ones
    poll_s: float = 2.0

    def check(self) -> None:
        if not self.pool:
            raise ConfigError("launcher work-pool: missing pool (--launcher-set pool=NAME)")


@flow(name=FLOW_NAME)
def trainer_job(module: str, args: list[str], nproc: int = 1, env: dict | None = None,
                timeout_s: float | None = None) -> int:
    """Run the job with torchrun on this worker's machine (the `local` launcher), log lines to Prefect."""
    log = get_run_logger()
    job = TrainerJob(module, tuple(args), log_dir=".", nproc=nproc, env=dict(env or {}))
    launch_local(job, LocalSettings(), timeout_s, lambda line: log.info("%s", line))
    return 0


def job_variables_for(pool_type: str, s: WorkPoolSettings, job: TrainerJob) -> dict:
    """The run's job variables, rendered from the launcher settings and the job (one place for both pool kinds)."""
    env = {**job.env, "PREFECT_LOGGING_TO_API_ENABLED": "true"}  # the run's lines reach the API, so we can forward them
    if pool_type == "kubernetes":
        if not s.image:
            raise ConfigError("launcher work-pool: a kubernetes pool needs image (--launcher-set image=REF)")
        base = {"image": s.image, "namespace": s.namespace, "gpu_count": job.nproc, "env": env}
    else:
        base = {"env": env}
    return {**base, **s.job_variables}


def ensure_deployment(s: WorkPoolSettings, pool_type: str) -> str:
    """Register (or update) the trainer-job deployment on the pool; returns its `flow/deployment` name.
    Process pools run it from `repo` on the worker's machine; kubernetes pools from the project image."""
    import os

    if pool_type == "kubernetes":
        trainer_job.deploy(name=s.deployment, work_pool_name=s.pool, image=s.image, build=False, push=False,
                           print_next_steps=False)
    else:
        repo = s.repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        trainer_job.from_source(source=repo, entrypoint=ENTRYPOINT).deploy(
            name=s.deployment, work_pool_name=s.pool, build=False, push=False, print_next_steps=False)
    return f"{FLOW_NAME}/{s.deployment}"


def launch_work_pool(job: TrainerJob, s: WorkPoolSettings, timeout_s: float | None, log: Log) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    with get_client(sync_client=True) as client:
        pool_type = client.read_work_pool(s.pool).type
    name = ensure_deployment(s, pool_type)
    run = run_deployment(name, parameters={"module": job.module, "args": list(job.args), "nproc": job.nproc,
                                           "env": job.env, "timeout_s": timeout_s},
                         job_variables=job_variables_for(pool_type, s, job), timeout=0)
    log(f"submitted flow run {run.name} ({run.id}) of {name} on work pool {s.pool} ({pool_type}); "
        f"logs: {PREFECT_UI_URL.value() or ''}/runs/flow-run/{run.id}")
    wait_for_run(run.id, s.poll_s, timeout_s, log)


def wait_for_run(run_id, poll_s: float, timeout_s: float | None, log: Log) -> None:
    """Forward the run's log lines while it runs; raise TrainProcessError unless it completed (cancel it if we
    stop waiting: timeout, or an exception here such as the caller being cancelled)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.states import Cancelling

    deadline = time.monotonic() + timeout_s if timeout_s else None
    seen, tail, finished = 0, [], False
    with get_client(sync_client=True) as client:
        def forward() -> int:
            nonlocal seen, tail
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, offset=seen, limit=200)
            seen += len(logs)
            for rec in logs:
                tail = (tail + [rec.message])[-200:]
                log(rec.message)
            return len(logs)

        try:
            while True:
                state = client.read_flow_run(run_id).state
                forward()
                if state is not None and state.is_final():
                    break
                if deadline and time.monotonic() > deadline:
                    raise TrainProcessError(f"flow run {run_id} timed out after {timeout_s:.0f}s (cancelled)", None, tail)
                time.sleep(poll_s)
            finished = True
            time.sleep(poll_s)  # the run's last lines are sent in batches: they may land after its final state
            while forward():
                time.sleep(poll_s)
        finally:
            if not finished:
                client.set_flow_run_state(run_id, Cancelling(), force=True)
                log(f"cancelled flow run {run_id}")
    if not state.is_completed():
        raise TrainProcessError(f"flow run {run_id} ended {state.type.value}: {state.message or ''}".strip(), None, tail)


register_launcher(LauncherSpec("work-pool", WorkPoolSettings, launch_work_pool, lambda s, nproc: nproc,
                               "a Prefect deployment on a work pool (process, kubernetes)"))
