"""CPU-bound dataset stages as many small Prefect tasks, for a Dask cluster (or threads) - flows/runners.py.

    filter_yfcc_distributed   YFCC100M metadata -> caption table, one task per byte range
                              (datasets/sources/yfcc_chunks.py: identical rows and report to yfcc.filter_yfcc)
    verify_dataset_distributed  re-hash every file of an artifact and check every shard's samples
                              against sizes.json, one task per batch of files / per shard

    python -m flows.filter_distributed filter METADATA OUT.parquet --subset S --runner dask --workers 8
    python -m flows.filter_distributed verify MANIFEST_URL --runner dask://scheduler:8786

The caption table it writes is a normal url + caption table (`key` kept), so the dataset stage takes it
as its source: `slip dataset build OUT.parquet --store ...`. Tasks are not cached (NO_CACHE): they are
pure functions of byte ranges; caching the whole filter is the dataset flow's job (flows/build_dataset.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import uuid

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from datasets import shardcheck
from datasets.sources import yfcc_chunks
from flows.runners import with_runner
from slip_core import artifacts, storage


@task(name="count-lines", cache_policy=NO_CACHE)
def count_lines_task(metadata: str, start: int, end: int) -> int:
    return yfcc_chunks.count_lines(metadata, start, end)


@task(name="filter-range", cache_policy=NO_CACHE, retries=1)
def filter_range_task(metadata: str, start: int, end: int, part: str, subset: str | None, mode: str,
                      line_offset: int) -> dict:
    return yfcc_chunks.filter_range(metadata, start, end, part, subset, mode, line_offset)


@flow(name="filter-yfcc-distributed")
def filter_yfcc_distributed(metadata: str, output: str, subset: str | None = None, mode: str = "slip",
                            chunks: int = 8, line_offset: int = 0) -> dict:
    """Filter `metadata` in `chunks` parallel byte ranges into `output`; returns the filter report."""
    log = get_run_logger()
    ranges = yfcc_chunks.plan_ranges(metadata, chunks)
    counts = None
    if len(ranges) > 1 and yfcc_chunks.needs_line_counts(metadata):  # 23 columns: rows numbered by position
        counts = [f.result() for f in [count_lines_task.submit(metadata, a, b) for a, b in ranges]]
    offsets = yfcc_chunks.line_offsets(metadata, ranges, counts, line_offset)
    parts_dir = f"{output}.parts-{uuid.uuid4().hex[:8]}"  # a concurrent run never shares parts
    parts = [storage.join(parts_dir, f"part-{i:05d}.parquet") for i in range(len(ranges))]
    futures = [filter_range_task.submit(metadata, a, b, p, subset, mode, off)
               for (a, b), p, off in zip(ranges, parts, offsets)]
    reports = [f.result() for f in futures]
    report = yfcc_chunks.finish(parts, reports, output, parts_dir).to_dict()
    log.info("filtered %d rows in %d ranges: %d written, %d malformed", report["rows_read"], len(ranges),
             report["written"], report["malformed"])
    return report


@task(name="verify-files", cache_policy=NO_CACHE)
def verify_files_task(url: str, manifest_json: str, first: int, count: int) -> list[str]:
    """artifacts.verify on files[first:first+count] (the same checks and messages, on a slice), re-hashing
    every byte (full=True: this flow is the full verification; reuse checks use the size+mtime fast path)."""
    m = artifacts.Manifest.from_json(manifest_json)
    return artifacts.verify(url, dataclasses.replace(m, files=m.files[first:first + count]), full=True)


@task(name="check-shard", cache_policy=NO_CACHE)
def check_shard_task(root: str, rel: str, expected: int) -> list[str]:
    return shardcheck.check_shard(root, rel, expected)


@flow(name="verify-dataset-distributed")
def verify_dataset_distributed(manifest_url: str, files_per_task: int = 16) -> list[str]:
    """Problems with a dataset artifact ([] = it verifies): hashes (in manifest order, exactly what
    artifacts.verify reports) followed by per-shard content problems (in shard order)."""
    url = artifacts.manifest_url(manifest_url)
    m = artifacts.load_manifest(url)
    root = artifacts.artifact_root(url)
    text = m.to_json()
    starts = range(0, len(m.files), max(1, files_per_task))
    hashed = [verify_files_task.submit(url, text, s, files_per_task) for s in starts]
    sizes = json.loads(storage.read_text(storage.join(root, "sizes.json"))) if any(
        f.path == "sizes.json" for f in m.files) else {}
    checked = [check_shard_task.submit(root, rel, n) for rel, n in sorted(sizes.items())]
    problems = [p for f in hashed for p in f.result()] + [p for f in checked for p in f.result()]
    get_run_logger().info("%s: %d file(s), %d shard(s), %d problem(s)", url, len(m.files), len(sizes), len(problems))
    return problems


# Deployment entry points (infra/prefect.yaml): a flow's task runner is fixed once it starts, so these
# parents pick it from a parameter and run the flow above as a subflow on it.
@flow(name="filter-yfcc-on-cluster")
def filter_yfcc_on_cluster(metadata: str, output: str, subset: str | None = None, mode: str = "slip",
                           chunks: int = 8, runner: str = "dask", n_workers: int = 2) -> dict:
    kw = {"n_workers": n_workers} if runner == "dask" else {}
    return with_runner(filter_yfcc_distributed, runner, **kw)(metadata, output, subset, mode, chunks)


@flow(name="verify-dataset-on-cluster")
def verify_dataset_on_cluster(manifest_url: str, runner: str = "dask", n_workers: int = 2) -> list[str]:
    kw = {"n_workers": n_workers} if runner == "dask" else {}
    return with_runner(verify_dataset_distributed, runner, **kw)(manifest_url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.filter_distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--runner", default="dask", help="threads | dask | dask://host:port")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (runner 'dask')")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("filter")
    f.add_argument("metadata")
    f.add_argument("output")
    f.add_argument("--subset")
    f.add_argument("--mode", default="slip", choices=["slip", "strict"])
    f.add_argument("--chunks", type=int, default=0, help="byte ranges (default: 4 per worker)")
    f.add_argument("--line-offset", type=int, default=0)
    v = sub.add_parser("verify")
    v.add_argument("manifest")
    a = ap.parse_args(argv)
    kw = {"n_workers": a.workers} if a.runner == "dask" else {}
    if a.cmd == "filter":
        report = with_runner(filter_yfcc_distributed, a.runner, **kw)(
            a.metadata, a.output, a.subset, a.mode, a.chunks or 4 * a.workers, a.line_offset)
        report["malformed_lines"] = report["malformed_lines"][:20]
        print(json.dumps(report, indent=1))
        return 0
    problems = with_runner(verify_dataset_distributed, a.runner, **kw)(a.manifest)
    print("\n".join(problems) or "ok")
    return 1 if problems else 0


if __name__ == "__main__":  # LocalCluster workers are spawned processes: keep this guard
    sys.exit(main())
