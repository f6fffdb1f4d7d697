"""Task runners by name, so one flow runs on threads here and on a Dask cluster elsewhere, unchanged.

    task_runner("threads")               Prefect's ThreadPoolTaskRunner (default; fine for I/O-bound tasks)
    task_runner("dask")                  a temporary dask.distributed LocalCluster per flow run
                                         (worker processes: CPU-bound tasks run truly in parallel)
    task_runner("dask://10.0.0.5:8786")  an existing Dask scheduler (dask-scheduler + dask-worker on many
                                         machines, dask-kubernetes, dask-jobqueue SLURM, Coiled, ...)

Use: `my_flow.with_options(task_runner=task_runner("dask", n_workers=8))(...)`, or `with_runner`.
Tasks running on a Dask worker read and write through fsspec URLs, so for a multi-machine cluster the
store must be shared (s3://..., a shared mount). prefect-dask is an optional dependency (extra `scale`).
"""
from __future__ import annotations

from typing import Any


def task_runner(name: str = "threads", n_workers: int = 2, threads_per_worker: int = 1,
                max_workers: int | None = None, memory_limit: str | None = None):
    """A Prefect task runner for `name` ("threads" | "dask" | "dask://host:port" | "tcp://host:port")."""
    if name in ("threads", "thread", "default"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    if name == "dask" or name.startswith(("dask://", "tcp://", "tls://")):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("task runner 'dask' needs prefect-dask: pip install 'slip-pipeline[scale]'") from e
        if name == "dask":
            kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": threads_per_worker,
                                      "processes": True, "dashboard_address": None}
            if memory_limit:
                kwargs["memory_limit"] = memory_limit
            return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
        address = "tcp://" + name.split("://", 1)[1] if name.startswith("dask://") else name
        return DaskTaskRunner(address=address)
    raise ValueError(f"unknown task runner {name!r}: use 'threads', 'dask' or 'dask://host:port'")


def with_runner(flow_fn, runner: str = "threads", **runner_kwargs):
    """`flow_fn` with the named task runner (a copy; the decorated flow is unchanged)."""
    return flow_fn.with_options(task_runner=task_runner(runner, **runner_kwargs))
