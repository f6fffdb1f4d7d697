"""Prefect flow for the dataset stage: filter -> plan -> download (mapped over shard groups) -> verify -> publish.

The logic lives in datasets/ (pipeline.py, plan.py, download.py, ledger.py, publish.py, sources/); the tasks only call it. Caching: the
filter and publish tasks use flows.caching's content policy (input sha256s, manifests by manifest sha256,
config by value, and the code identity of the caption-table resp. dataset stage: pipeline.TABLE_CODE,
publish.DATASET_CODE); publish is also keyed on the ledger fingerprint, so an unchanged rerun is two cache
hits and a ledger read. Plan/download are never cached by Prefect: their cache is img2dataset's per-shard
`_stats.json` markers (kill-and-rerun resumes, see datasets/work.py).
"""
from __future__ import annotations

import re

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from datasets import config as dataset_config
from datasets import download, engine, ledger, pipeline, plan, publish, work
from datasets.sources.detect import detect_source
from flows.caching import stage_cache
from slip_core import artifacts, procs
from slip_core.config import from_dict, to_dict
from slip_core.progress import Progress
from slip_core.store import Store


def _cfg(config: dict) -> dataset_config.DatasetConfig:
    """The resolved DatasetConfig the flow hands its tasks (as a dict)."""
    return from_dict(dataset_config.DatasetConfig, config)


@task(name="filter", cache_policy=stage_cache(pipeline.TABLE_CODE, "source", "subset"), persist_result=True)
def filter_task(source: str, subset: str | None, store: str, config: dict, source_sha256: str, subset_sha256: str) -> str:
    """Keyed on the CONTENT hashes of source and subset (memoised per size/mtime, see pipeline.file_sha256),
    not on their paths: a renamed copy is a hit, an edited file a miss, a 50 GB file is not re-read."""
    return pipeline.prepare_table(source, store, _cfg(config), subset)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(table_manifest: str, store: str, config: dict, retry_failed: bool) -> list[dict]:
    cfg = _cfg(config)
    groups = plan.plan(pipeline.table_of(table_manifest), work.work_dir(store, cfg), cfg, retry_failed)
    return [g.__dict__ for g in groups]


@task(name="download", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def download_task(group: dict, config: dict, progress: bool) -> dict:
    return download.run_group(work.Group(**group), _cfg(config), progress=progress)


@task(name="download-spark", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def download_spark_task(groups: list[dict], config: dict, progress: bool) -> list[dict]:
    """distributor "pyspark": every group in one Spark application (datasets/download.run_groups)."""
    return list(download.run_groups([work.Group(**g) for g in groups], _cfg(config), progress=progress))


@task(name="verify", cache_policy=NO_CACHE)
def verify_task(table_manifest: str, store: str, config: dict) -> dict:
    """Every input row has exactly one status (raises otherwise); returns the summary + ledger fingerprint."""
    cfg = _cfg(config)
    with engine.connect() as con:
        ledger.build_ledger(con, pipeline.table_of(table_manifest), work.work_dir(store, cfg), pipeline.malformed_of(table_manifest))
        summary = ledger.status_summary(con)
        summary["fingerprint"] = ledger.ledger_fingerprint(con)
        if cfg.quality.enabled:  # issue 10: hash every image once, here (cached per shard; publish's quality pass reuses it)
            publish.fingerprint_shards(con, cfg)
            summary["images_fingerprinted"] = summary["by_status"]["success"]
    return summary


@task(name="publish", cache_policy=stage_cache(publish.DATASET_CODE, "summary"), persist_result=True)
def publish_task(table_manifest: str, store: str, config: dict, fingerprint: str, summary: dict) -> str:
    url = pipeline.publish(table_manifest, store, _cfg(config))
    _report(url, summary)
    return url


def _report(manifest_url: str, summary: dict) -> None:
    m = artifacts.load_manifest(manifest_url)
    key = re.sub(r"[^a-z0-9-]+", "-", f"dataset-{m.name}".lower())
    sizes = {f.path: f.size for f in m.files if f.path.startswith("shards/")}
    create_table_artifact(key=f"{key}-reasons", table=summary["reasons"] or [{"status": "-", "reason": "none", "count": 0}],
                          description="failure / filter reasons by count")
    by = summary["by_status"]
    lines = [f"# Dataset `{m.name}`", "", f"manifest: `{manifest_url}` (sha256 {m.sha256[:12]}, code {m.code_version})", "",
             f"- rows: {summary['rows']}, samples: {m.metrics.get('num_samples')}, success rate: {100 * summary['success_rate']:.2f} %",
             "- " + ", ".join(f"{k}: {v}" for k, v in by.items()), "", "| shard | bytes |", "|---|---|"]
    lines += [f"| {p} | {s} |" for p, s in sorted(sizes.items())[:50]]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines), description="dataset build summary")


@flow(name="build-dataset")
def build_dataset(source: str, store: str, config: dict | None = None, subset: str | None = None,
                  retry_failed: bool = False, progress: bool = False, preset: str | None = None) -> str:
    """YFCC100M metadata (+ subset) or any url+caption table -> verified webdataset shards.
    `preset`: DATASET_PRESETS name (default "yfcc15m"; the demo uses "tiny"); `config`: DatasetConfig
    overrides (dotted keys allowed; a "preset" key there is read as `preset`, as older callers pass it).
    Returns the dataset manifest URL."""
    log = get_run_logger()
    config = dict(config or {})
    legacy_preset = config.pop("preset", None)
    cfg = dataset_config.make_config(config, preset or legacy_preset)
    cfg_dict = {**to_dict(cfg)}
    st = Store(store)
    sha = (pipeline.source_sha256(source, store, detect_source(source)), pipeline.file_sha256(subset, store) if subset else "")
    table = filter_task(source, subset, store, cfg_dict, *sha)
    log.info("dataset: %s", st.status(publish.dataset_identity(artifacts.load_manifest(table).sha256, cfg)).line())
    # One build per work folder at a time; SIGTERM (a Prefect cancellation) reaches img2dataset at once, or
    # this thread's unwinding would wait for the mapped download tasks until their downloads finish.
    with work.work_lock(work.work_dir(store, cfg)), procs.forward_termination():
        groups = plan_task(table, store, cfg_dict, retry_failed)
        log.info("%d shard group(s) to download (%d rows)", len(groups), sum(g["n_rows"] for g in groups))
        if cfg.distributor == "pyspark":
            waves = [download_spark_task(groups, cfg_dict, progress)] if groups else []
        else:
            waves = (download_task.map(groups[s:s + max(1, cfg.parallel_groups)], config=unmapped(cfg_dict),
                                       progress=unmapped(progress)).result()
                     for s in range(0, len(groups), max(1, cfg.parallel_groups)))
        ok = rows = 0
        with Progress("download", len(groups), "groups", log=log.info) as bar:  # a bar on a terminal, else lines
            for wave in waves:
                for r in wave:
                    ok, rows = ok + r["successes"], rows + r["rows"]
                    bar.update(1, ok=f"{ok}/{rows} rows", last=f"{r['rows'] / max(r['seconds'], 1e-9):.0f} rows/s")
        summary = verify_task(table, store, cfg_dict)
        url = publish_task(table, store, cfg_dict, summary["fingerprint"], summary)
    log.info("dataset: %s (%s)", url, summary["by_status"])
    return url
