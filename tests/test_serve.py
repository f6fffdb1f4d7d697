"""`slip serve` registers cron-scheduled deployments on a real Prefect server and runs them."""
import os
import subprocess
import sys
import time

import pytest

from tests._procs import stop_group

pytestmark = pytest.mark.prefect


def _wait_for_deployment(name: str, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    while time.time() < deadline:
        with get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(name)
            except Exception:
                time.sleep(1)
    raise TimeoutError(f"deployment {name} never appeared")


def test_serve_registers_schedules_and_runs_a_deployment(prefect_server, tmp_path):
    from prefect.deployments import run_deployment

    store = tmp_path / "store"
    (store / "checkpoint").mkdir(parents=True)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    exe = os.path.join(os.path.dirname(sys.executable), "slip")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([exe, "serve", "--store", str(store), "--source", str(tmp_path / "meta.tsv"),
                             "--eval-cron", "*/30 * * * *"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = _wait_for_deployment("evaluate-new-checkpoints/sweep", timeout=120)
        crons = [s.schedule.cron for s in dep.schedules]
        assert crons == ["*/30 * * * *"]
        nightly = _wait_for_deployment("nightly-dataset-rebuild/nightly", timeout=30)
        assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
        run = run_deployment("evaluate-new-checkpoints/sweep", timeout=180, poll_interval=2)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        stop_group(proc, grace_s=30)
        log.close()
