"""Scheduled work: a nightly incremental dataset rebuild and an evaluate-new-checkpoints sweep.

`slip serve` registers both as deployments with cron schedules on a running Prefect server
(`slip server start`, SQLite on 127.0.0.1) and serves them from this process; the same flows are declared
for a process work pool in infra/prefect.yaml. Artifacts are found through slip_core.store.Store.
"""
from __future__ import annotations

import os

from prefect import flow, get_run_logger

from slip_core import artifacts
from slip_core.store import Store

DATASET_CRON = "0 3 * * *"  # nightly, 03:00 UTC
EVAL_CRON = "0 * * * *"  # hourly sweep for new checkpoints


def unevaluated_checkpoints(store: str) -> list[str]:
    """Checkpoint manifests in `store` that verify and that no eval artifact was built from (oldest first)."""
    st = Store(store)
    evaluated = {up.sha256 for _, m in st.published("eval") for up in m.upstream.values() if up.kind == "checkpoint"}
    todo = [url for url, m in st.published("checkpoint") if m.sha256 not in evaluated and not artifacts.verify(url, m)]
    return todo[::-1]


@flow(name="evaluate-new-checkpoints")
def evaluate_new_checkpoints(store: str, preset: str = "tiny") -> list[str]:
    """Evaluate every verified checkpoint in the store that has no evaluation yet."""
    from flows.evaluate import evaluate

    log = get_run_logger()
    todo = unevaluated_checkpoints(store)
    log.info("%d new checkpoint(s) in %s", len(todo), store)
    return [evaluate(checkpoint=url, store=store, preset=preset) for url in todo]


@flow(name="nightly-dataset-rebuild")
def nightly_dataset_rebuild(source: str, store: str, subset: str | None = None, config: dict | None = None,
                            preset: str | None = None) -> str:
    """Incremental rebuild: only rows not attempted before are downloaded (see flows.build_dataset)."""
    from flows.build_dataset import build_dataset

    return build_dataset(source=source, store=store, config=config, subset=subset, preset=preset)


def deployments(store: str, source: str | None, subset: str | None = None,
                dataset_cron: str = DATASET_CRON, eval_cron: str = EVAL_CRON, eval_preset: str = "tiny"):
    deps = [evaluate_new_checkpoints.to_deployment(
        name="sweep", cron=eval_cron, parameters={"store": store, "preset": eval_preset},
        tags=["slip", "eval"], description="Evaluate checkpoints that have no evaluation yet")]
    if source:
        deps.append(nightly_dataset_rebuild.to_deployment(
            name="nightly", cron=dataset_cron, parameters={"source": source, "store": store, "subset": subset},
            tags=["slip", "dataset"], description="Incremental dataset rebuild from the latest metadata snapshot"))
    return deps


def serve_forever(store: str, source: str | None, subset: str | None = None, **kw) -> None:
    from prefect import serve

    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("slip serve needs a running Prefect server: run `slip server start` (or set "
                         "PREFECT_API_URL to one); schedules cannot run on an ephemeral server")
    serve(*deployments(store, source, subset, **kw), pause_on_shutdown=False)
