"""infra/prefect.yaml against a real Prefect server: both work pools created as documented (process, and
kubernetes with the GPU base job template), every deployment registered by `prefect deploy --all`, and one
deployment run end to end by a real process worker (`prefect worker start --pool slip-process`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from datasets.sources import yfcc
from slip_core import launchers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.prefect
EXPECTED = {  # flow/deployment -> work pool
    "reproduce/tiny": "slip-process", "nightly-dataset-rebuild/nightly": "slip-process",
    "evaluate-new-checkpoints/sweep": "slip-process", "filter-yfcc-on-cluster/dask-local": "slip-process",
    "pretrain/slip-vitb16-8gpu": "slip-k8s", "filter-yfcc-on-cluster/dask-cluster": "slip-k8s",
    "pretrain/slip-vitb16-64gpu-slurm": "slip-process",
}


def _prefect(args: list[str], env: dict, timeout: float = 180) -> str:
    r = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_gpu_job_template_adds_gpus_shm_and_node_selector():
    sys.path.insert(0, os.path.join(REPO, "infra"))
    from k8s_gpu_job_template import gpu_template

    default = {"variables": {"properties": {"image": {"type": "string"}}},
               "job_configuration": {"job_manifest": {"spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}}}}
    t = gpu_template(default)
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory" and pod["nodeSelector"] == "{{ node_selector }}"
    assert default["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"] == [{"name": "c"}]


def test_deploy_prefect_yaml_and_run_through_a_process_worker(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    sys.path.insert(0, os.path.join(REPO, "infra"))
    from k8s_gpu_job_template import default_kubernetes_template, gpu_template

    store = str(tmp_path / "store")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "SLIP_REPO": REPO, "SLIP_STORE": store,
           "SLIP_IMAGE": "registry.example.com/slip-pipeline:test", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    template = tmp_path / "slip-k8s.json"
    template.write_text(json.dumps(gpu_template(default_kubernetes_template())))
    _prefect(["work-pool", "create", "slip-process", "--type", "process"], env)
    _prefect(["work-pool", "create", "slip-k8s", "--type", "kubernetes", "--base-job-template", str(template)], env)
    _prefect(["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"], env, timeout=300)

    with get_client(sync_client=True) as client:
        deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert {k: d.work_pool_name for k, d in deps.items() if k in EXPECTED} == EXPECTED
        gpu = deps["pretrain/slip-vitb16-8gpu"]
        assert gpu.job_variables["gpu_count"] == 8 and gpu.job_variables["image"] == env["SLIP_IMAGE"]
        assert gpu.parameters["store"] == store and gpu.parameters["nproc"] == 8
        assert gpu.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/slip-pipeline"
        slurm = deps["pretrain/slip-vitb16-64gpu-slurm"].parameters  # the flow submits it through submitit
        assert launchers.world_size(slurm["launcher"], slurm["nproc"]) == 64
        tiny = deps["reproduce/tiny"]  # process pool: runs in the repository named by SLIP_REPO at deploy time
        assert tiny.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == REPO
        pool = client.read_work_pool("slip-k8s")
        assert "gpu_count" in pool.base_job_template["variables"]["properties"]
        nightly = deps["nightly-dataset-rebuild/nightly"]
        assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"] and not nightly.schedules[0].active

        # Run the metadata filter deployment through a real process worker, on a small generated file.
        meta, subset = tmp_path / "meta", tmp_path / "subset.tsv"
        meta.write_text("".join(yfcc.format_row(i, 10**6 + i, "h", f"title {i}", "", f"http://x/{i}.jpg") + "\n"
                                for i in range(300)))
        subset.write_text("".join(f"{i}\t{10**6 + i}\th\n" for i in range(0, 300, 3)))
        out = str(tmp_path / "captions.parquet")
        run = client.create_flow_run_from_deployment(
            deps["filter-yfcc-on-cluster/dask-local"].id,
            parameters={"metadata": str(meta), "subset": str(subset), "output": out, "chunks": 3, "runner": "threads"})
        t0 = time.time()
        _prefect(["worker", "start", "--pool", "slip-process", "--run-once", "--limit", "1"], env, timeout=300)
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    table = pq.read_table(out)
    assert table.num_rows == 100 and table["key"].to_pylist()[:2] == ["000000000", "000000003"]
    print(f"worker run: {time.time() - t0:.1f}s")
