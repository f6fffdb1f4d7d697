"""Base job template for a Prefect *kubernetes* work pool whose flow-run pods get GPUs (pretraining).

Starts from the kubernetes worker's own default template, asked from the Prefect server you are logged
in to (so it always matches that Prefect version), and adds what a training pod needs:

  gpu_count      job variable -> resources.limits/requests["nvidia.com/gpu"] (NVIDIA device plugin)
  node_selector  job variable -> pod nodeSelector, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
  /dev/shm       a memory-backed emptyDir: DataLoader workers hand batches over through shared memory,
                 and a container's default /dev/shm (64 MB) is far too small for 10 workers per GPU

    python infra/k8s_gpu_job_template.py > gpu-template.json
    prefect work-pool create slip-k8s --type kubernetes --base-job-template gpu-template.json

Then deployments on that pool set `job_variables: {gpu_count: 8, image: ...}` (infra/prefect.yaml).
"""
from __future__ import annotations

import json
import sys


def gpu_template(default: dict, shm_size: str = "64Gi") -> dict:
    """The kubernetes default base job template with GPU, node selector and /dev/shm added."""
    t = json.loads(json.dumps(default))
    props = t["variables"]["properties"]
    props["gpu_count"] = {"title": "GPUs", "description": "nvidia.com/gpu per flow-run pod (0: none)",
                          "type": "integer", "default": 0, "minimum": 0}
    props["node_selector"] = {"title": "Node selector", "description": "pod nodeSelector labels",
                              "type": "object", "additionalProperties": {"type": "string"}, "default": {}}
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    resources = container.setdefault("resources", {})
    resources.setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    resources.setdefault("requests", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod.setdefault("volumes", []).append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
    container.setdefault("volumeMounts", []).append({"name": "dshm", "mountPath": "/dev/shm"})
    return t


def default_kubernetes_template() -> dict:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        meta = client.read_worker_metadata()
    return meta["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


if __name__ == "__main__":
    json.dump(gpu_template(default_kubernetes_template()), sys.stdout, indent=2)
    print()
