"""The whole chain as one Prefect flow: raw URLs -> shards -> pretrain -> eval -> report.

Each stage is its own flow (flows/build_dataset.py, pretrain.py, evaluate.py) whose output is a
content-addressed artifact; this flow only chains their manifest URLs, checks each one still verifies
(a tampered or partial artifact is rebuilt and the event reported), and writes the report.
`rebuild="train"` forces that stage and everything downstream (Prefect refresh_cache).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from evaluation import pipeline_report
from slip_core import artifacts, storage

STAGES = ("dataset", "train", "eval")


@dataclass(frozen=True)
class ReproducePreset:
    dataset: str  # datasets.config.DATASET_PRESETS key
    train: str  # slip_core.trainer.TRAIN_PRESETS key
    eval: str  # EVAL_PRESETS key
    demo_corpus: bool = False  # build the embedded demo corpus and serve it on 127.0.0.1
    dataset_rows: int = 0  # expected input rows (dry-run estimate when no dataset is built yet)


# Input rows per paper dataset: YFCC15M as SLIP logged it (SPEC §1); CC3M / CC12M as published.
PAPER_ROWS = {"yfcc15m": 14_689_580, "cc3m": 3_318_333, "cc12m": 12_423_374}


def _paper_presets() -> dict[str, ReproducePreset]:
    """One reproduce preset per paper training preset named `<kind>_<vit>_<data>_<N>ep`."""
    from slip_core.trainer import TRAIN_PRESETS

    out = {}
    for name in TRAIN_PRESETS:
        parts = name.split("_")
        if len(parts) == 4 and parts[2] in PAPER_ROWS and parts[3].endswith("ep"):
            out[name] = ReproducePreset(dataset=parts[2], train=name, eval="paper", dataset_rows=PAPER_ROWS[parts[2]])
    return out


REPRODUCE_PRESETS: dict[str, ReproducePreset] = {
    "tiny": ReproducePreset(dataset="tiny", train="tiny", eval="tiny", demo_corpus=True, dataset_rows=3000),
    **_paper_presets(),
}


def _local_cache(store: str) -> str:
    if storage.is_local(store):
        return artifacts.local_path(storage.join(store, "raw"))
    return os.path.join(os.path.expanduser("~"), ".cache", "slip-pipeline", "raw")


def _run(fn, refresh: bool, **kwargs) -> str:
    if not refresh:
        return fn(**kwargs)
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        return fn(**kwargs)


def _stage(name: str, fn, forced: set[str], **kwargs) -> str:
    """Run one stage flow; if what it returns does not verify, rebuild it once and report the event."""
    log = get_run_logger()
    url = _run(fn, name in forced, **kwargs)
    problems = artifacts.verify(url)
    if problems:
        log.warning("%s artifact %s does not verify (%s): rebuilding", name, url, "; ".join(problems[:5]))
        create_markdown_artifact(key=f"rebuilt-{name}", description="artifact failed verification",
                                 markdown=f"# {name} artifact rebuilt\n\n`{url}` failed verification:\n\n"
                                 + "\n".join(f"- {p}" for p in problems))
        url = _run(fn, True, **kwargs)
        problems = artifacts.verify(url)
        if problems:
            raise artifacts.ManifestError(f"{name} artifact still does not verify after rebuild: {problems}")
    return url


def write_report(store: str, dataset: str, checkpoint: str, evaluation: str) -> str:
    """HTML report as its own artifact (upstream: the three stage manifests). Returns the report file URL."""
    ups = {role: artifacts.upstream_ref(u) for role, u in
           (("dataset", dataset), ("checkpoint", checkpoint), ("eval", evaluation))}
    root = artifacts.stage_root(store, "report", "pipeline", *(u.sha256 for u in ups.values()))
    report = storage.join(root, "report.html")
    with artifacts.stage_lock(root):  # a concurrent reproduce of the same inputs reuses this report
        if artifacts.is_complete(root):
            return report
        storage.atomic_write_text(report, pipeline_report.build_report(dataset, checkpoint, evaluation))
        artifacts.publish(artifacts.build_manifest(root, ["report.html"], kind="report", name="pipeline",
                                                   upstream=ups), root)
    return report


@flow(name="reproduce")
def reproduce(preset: str = "tiny", store: str = "out/store", source: str | None = None, subset: str | None = None,
              rebuild: str | None = None, train_config: dict | None = None, eval_config: dict | None = None,
              demo_corpus: dict | None = None) -> dict:
    """Returns the manifest URLs of the three stages and the report's URL. `demo_corpus`: arguments of
    datasets.demo_corpus.build_demo_corpus (e.g. a smaller n_fashion for tests)."""
    from flows.build_dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.pretrain import pretrain

    log = get_run_logger()
    p = REPRODUCE_PRESETS[preset]
    forced = set(STAGES[STAGES.index(rebuild):]) if rebuild else set()
    server = contextlib.nullcontext()
    if source is None and p.demo_corpus:
        from datasets.demo_corpus import build_demo_corpus

        corpus = build_demo_corpus(os.path.join(_local_cache(store), "demo-corpus"), **(demo_corpus or {}))
        source, subset, server = corpus.metadata, corpus.subset, corpus.serve()
        log.info("demo corpus: %d metadata rows, images served from %s", corpus.n_rows, corpus.base_url)
    if source is None:
        raise ValueError(f"preset {preset!r} needs --source (YFCC100M metadata or a url+caption table)")
    with server:
        dataset = _stage("dataset", build_dataset, forced, source=source, store=store, subset=subset,
                         config={"preset": p.dataset})
    checkpoint = _stage("train", pretrain, forced, dataset=dataset, store=store, preset=p.train, config=train_config)
    evaluation = _stage("eval", evaluate, forced, checkpoint=checkpoint, store=store, preset=p.eval, config=eval_config)
    report = write_report(store, dataset, checkpoint, evaluation)
    if storage.is_local(report):
        create_link_artifact(key="pipeline-report", link=f"file://{artifacts.local_path(report)}",
                             link_text="pipeline report (HTML)")
    return {"dataset": dataset, "checkpoint": checkpoint, "eval": evaluation, "report": report}
