"""The dataset stage without Prefect: filter -> plan -> download groups -> publish.

flows/build_dataset.py runs the same steps as Prefect tasks; this module is what the tests, the
benchmark and `python -m datasets.pipeline` use directly, and the single place the steps are defined.
"""
from __future__ import annotations

import argparse
import json
import sys

from slip_core import artifacts, identity, storage
from slip_core.failpoints import failpoint
from slip_core.store import Store

from datasets import config, download, plan, publish as publish_mod, work
from datasets.sources import BadInput, captions, yfcc, yfcc_parquet
from datasets.ledger import MALFORMED_FILE
from datasets.sources.detect import detect_source


def file_sha256(url: str, store: str) -> str:
    """sha256 of a file's contents, memoised in the store (Store.content_sha256)."""
    return Store(store).content_sha256(url)


def source_sha256(source: str, store: str, kind: str) -> str:
    """Content hash of the source: its file's sha256, or for a parquet mirror of several files the sha256
    over their (name, sha256) list."""
    if kind != "yfcc-parquet":
        return file_sha256(source, store)
    fl = yfcc_parquet.files(source)
    if len(fl) == 1:
        return file_sha256(fl[0], store)
    listing = "\n".join(f"{u.rsplit('/', 1)[-1]}\t{file_sha256(u, store)}" for u in fl)
    return storage.sha256_bytes(listing.encode())


# The code a caption table is made by: the filters / normalisers of every source format.
TABLE_CODE = (yfcc.__name__, yfcc_parquet.__name__, captions.__name__)


def table_identity(source_sha256: str, subset_sha256: str, source_kind: str,
                   cfg: config.DatasetConfig) -> identity.StageIdentity:
    """Identity of the caption table of a source: its contents (and the subset's), the cleaning mode, the
    filter code. Download settings are not part of it: changing image size does not re-filter 100M rows."""
    return identity.stage("caption-table", cfg.name, {"source": source_sha256, "subset": subset_sha256},
                          {"clean_mode": cfg.clean_mode, "source_kind": source_kind}, TABLE_CODE)


def prepare_table(source: str, store: str, cfg: config.DatasetConfig, subset: str | None = None) -> str:
    """Caption-table artifact (captions.parquet + filter_report.json) for `source`; returns its manifest URL.
    Keyed on the contents of source and subset and the cleaning mode; an existing one is reused."""
    kind = detect_source(source)
    for url, what in ((source, "metadata"), (subset, "subset")):
        if url and not (kind == "yfcc-parquet" and url == source) and not storage.exists(url):
            raise BadInput(f"{url}: no such {what} file")
    src_sha = source_sha256(source, store, kind)
    sub_sha = file_sha256(subset, store) if subset else ""
    ident = table_identity(src_sha, sub_sha, kind, cfg)
    root = Store(store).stage_root(ident)
    murl = artifacts.manifest_url(root)
    if artifacts.is_complete(murl):  # complete and intact: reuse
        return murl
    with artifacts.stage_lock(root):  # a concurrent build of the same table waits, then reuses it
        if artifacts.is_complete(murl):
            return murl
        storage.remove_temp_files(root)  # what a killed earlier build left mid-write
        try:
            return _build_table(source, root, cfg, kind, subset, src_sha, sub_sha, ident)
        except BadInput:
            _remove_if_empty(root)  # nothing of a refused input stays behind
            raise


def _remove_if_empty(root: str) -> None:
    fs, p = storage.url_to_fs(root)
    if fs.exists(p) and not fs.ls(p):
        fs.rm(p, recursive=True)


def _build_table(source, root, cfg, kind, subset, src_sha, sub_sha, ident) -> str:
    out, bad = storage.join(root, "captions.parquet"), storage.join(root, MALFORMED_FILE)
    if kind in ("yfcc", "yfcc-parquet"):
        run = yfcc.filter_yfcc if kind == "yfcc" else yfcc_parquet.filter_yfcc_parquet
        report = run(source, out, subset=subset, mode=cfg.clean_mode, malformed_output=bad).to_dict()
        fs, p = storage.url_to_fs(out + ".report.json")
        fs.rm(p)
    else:
        report = captions.normalize_table(source, out, malformed_output=bad)
    report.update(source=source, source_sha256=src_sha, subset=subset or "", subset_sha256=sub_sha, kind=kind)
    storage.atomic_write_text(storage.join(root, "filter_report.json"), json.dumps(report, indent=1))
    m = artifacts.build_manifest(root, ["captions.parquet", MALFORMED_FILE, "filter_report.json"], kind="caption-table", name=cfg.name,
                                 config={"clean_mode": cfg.clean_mode, "subset_name": cfg.subset_name, "kind": kind,
                                         "source": source, "source_sha256": src_sha,
                                         "subset": subset or "", "subset_sha256": sub_sha},
                                 metrics={k: report[k] for k in ("rows", "written", "malformed", "in_subset") if k in report},
                                 identity=ident.to_dict())
    return artifacts.publish(m, root)


def table_of(table_manifest: str) -> str:
    return storage.join(artifacts.artifact_root(table_manifest), "captions.parquet")


def malformed_of(table_manifest: str) -> str:
    """The caption-table artifact's malformed rows (line number, reason): each gets a ledger row."""
    return storage.join(artifacts.artifact_root(table_manifest), MALFORMED_FILE)


def publish(table_manifest: str, store: str, cfg: config.DatasetConfig) -> str:
    report = json.loads(storage.read_text(storage.join(artifacts.artifact_root(table_manifest), "filter_report.json")))
    return publish_mod.publish(table_of(table_manifest), work.work_dir(store, cfg), cfg, store,
                               upstream={"captions": artifacts.upstream_ref(table_manifest)},
                               extra_stats={"filter": {k: v for k, v in report.items() if k != "malformed_lines"},
                                            "malformed_lines": report.get("malformed_lines", [])},
                               malformed_path=malformed_of(table_manifest))


def build(source: str, store: str, cfg: config.DatasetConfig, subset: str | None = None,
          retry_failed: bool = False, progress: bool = False) -> str:
    """The whole stage in this process; returns the dataset manifest URL."""
    tm = prepare_table(source, store, cfg, subset)
    failpoint("dataset.table_published")  # crash tests (slip_core/failpoints.py)
    with work.work_lock(work.work_dir(store, cfg)):
        groups = plan.plan(table_of(tm), work.work_dir(store, cfg), cfg, retry_failed=retry_failed)
        for _ in download.run_groups(groups, cfg, progress=progress):  # pyspark: one Spark application for all
            failpoint("dataset.group_downloaded")
        return publish(tm, store, cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dataset stage without Prefect (tests, benchmarks)")
    ap.add_argument("source")
    ap.add_argument("store")
    ap.add_argument("--subset")
    ap.add_argument("--preset", default="yfcc15m")
    ap.add_argument("--config", default="{}", help="JSON dict of DatasetConfig overrides")
    ap.add_argument("--retry-failed", action="store_true")
    a = ap.parse_args(argv)
    cfg = config.make_config(json.loads(a.config), a.preset)
    try:
        print(build(a.source, a.store, cfg, a.subset, a.retry_failed, progress=False))
    except BadInput as e:  # missing / truncated / garbage metadata: one line, no traceback, nothing written
        print(f"datasets.pipeline: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
