"""The whole chain as one Prefect flow: raw URLs -> shards -> pretrain -> eval -> report.

Each stage is its own flow (flows/build_dataset.py, pretrain.py, evaluate.py) whose output is an artifact
named by its stage identity. This flow first computes the plan (flows/status.py: per stage `cached` +
artifact or `will run` + why), logs it and attaches it as a markdown artifact, then runs exactly the stages
the plan says will run (a stage whose upstream ran is always handed to its flow, which finds its own
artifact again if the upstream came out the same), checks each output still verifies (a tampered or partial
artifact is rebuilt and the event reported), and writes the report. `rebuild="train"` forces that stage and
everything downstream (Prefect refresh_cache). A fully cached run reads the plan from the store's no-op
record and runs no stage flow at all. A preset's baselines (the demo: CLIP beside SLIP) are trained on the
same dataset artifact with the same schedule (equal steps) and evaluated the same way, as ordinary cached
stages `train-LABEL` / `eval-LABEL`; the report shows every arm side by side in the paper's Table 2 layout.
"""
from __future__ import annotations

import contextlib
import dataclasses

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from evaluation import pipeline_report
from flows import status
from flows.presets import reproduce_preset
from slip_core import artifacts, identity, storage
from slip_core.store import Store

REPORT_CODE = (pipeline_report.__name__,)


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


def write_report(store: str, dataset: str, checkpoint: str, evaluation: str,
                 baselines: dict[str, tuple[str, str]] | None = None) -> str:
    """HTML report as its own artifact (upstream: the stage manifests; `baselines`: label -> (checkpoint, eval)
    of the comparison arms). Returns the report file URL."""
    refs = [("dataset", dataset), ("checkpoint", checkpoint), ("eval", evaluation)]
    for label, (ck, ev) in (baselines or {}).items():
        refs += [(f"checkpoint-{label}", ck), (f"eval-{label}", ev)]
    ups = {role: artifacts.upstream_ref(u) for role, u in refs}
    ident = identity.stage("report", "pipeline", {role: u.sha256 for role, u in ups.items()}, {}, REPORT_CODE)
    st = Store(store)
    root = st.stage_root(ident)
    report = storage.join(root, "report.html")
    with st.lock(root):  # a concurrent reproduce of the same inputs reuses this report
        if artifacts.is_complete(root):
            return report
        storage.atomic_write_text(report, pipeline_report.build_report(
            dataset, checkpoint, evaluation, baselines=[ce for ce in (baselines or {}).values()]))
        artifacts.publish(artifacts.build_manifest(root, ["report.html"], kind="report", name="pipeline",
                                                   upstream=ups, identity=ident.to_dict()), root)
    return report


@flow(name="reproduce")
def reproduce(preset: str = "tiny", store: str = "out/store", source: str | None = None, subset: str | None = None,
              rebuild: str | None = None, train_config: dict | None = None, eval_config: dict | None = None,
              demo_corpus: dict | None = None, dataset_config: dict | None = None, nproc: int = 1,
              resume_from: str | None = None, baselines: bool = True) -> dict:
    """Returns the manifest URLs of the three stages, the report's URL and, for a preset with baselines (the
    demo: CLIP at SLIP's steps on the same dataset), `baselines`: label -> {checkpoint, eval}. `*_config`: overrides of the
    preset's stage configs; `demo_corpus`: arguments of datasets.demo_corpus.build_demo_corpus (e.g. a
    smaller n_fashion for tests); `resume_from`: continue training from another run's checkpoint;
    `baselines=False`: train and evaluate the preset's own model only."""
    log = get_run_logger()
    req = status.Request(preset, store, source, subset, rebuild, dataset_config, train_config, eval_config,
                         demo_corpus, nproc, baselines)
    p = status.effective_preset(req, reproduce_preset(preset))
    source, subset, corpus = status.demo_source(req, p, build=True)
    if source is None:
        raise ValueError(f"preset {preset!r} needs --source (YFCC100M metadata or a url+caption table)")
    if corpus is not None:
        log.info("demo corpus: %d metadata rows, images served from %s", corpus.n_rows, corpus.base_url)
    plans = status.reproduce_plan(req, p, source, subset)
    if resume_from and plans["train"].state == "run":
        plans["train"].reasons.append(f"continues from {resume_from} (--resume-from)")
    for s, pl in plans.items():
        log.info("%s: %s", s, pl.line())
    create_markdown_artifact(key="reproduce-plan", markdown=status.to_markdown(plans),
                             description="per stage: cached (artifact) or will run (why)")
    names = status.stage_names(p)
    forced = status.forced_stages(rebuild, names)
    ran: set[str] = set()

    def skip(stage: str, *upstream: str) -> bool:  # cached, and nothing upstream ran
        return plans[stage].state == "cached" and not ran.intersection(upstream)

    if skip("dataset"):  # stage flows are imported only when they run (torch, timm: seconds)
        dataset = plans["dataset"].artifact
    else:
        from flows.build_dataset import build_dataset

        ran.add("dataset")
        with corpus.serve() if corpus is not None else contextlib.nullcontext():
            dataset = _stage("dataset", build_dataset, forced, source=source, store=store, subset=subset,
                             preset=p.dataset, config=dataset_config)
    out = {"dataset": dataset}
    for arm in status.arms(p):  # the preset's own model, then its baselines: same dataset, same schedule
        if skip(arm.train, "dataset"):
            out[arm.train] = plans[arm.train].artifact
        else:
            from flows.pretrain import pretrain

            ran.add(arm.train)
            out[arm.train] = _stage(arm.train, pretrain, forced, dataset=dataset, store=store,
                                    preset=arm.train_preset, config=train_config, nproc=nproc,
                                    resume_from=resume_from if arm.label == "main" else None)
        if skip(arm.eval, "dataset", arm.train):
            out[arm.eval] = plans[arm.eval].artifact
        else:
            from flows.evaluate import evaluate

            ran.add(arm.eval)
            out[arm.eval] = _stage(arm.eval, evaluate, forced, checkpoint=out[arm.train], store=store,
                                   preset=p.eval, config=eval_config)
    baselines = {a.label: (out[a.train], out[a.eval]) for a in status.arms(p)[1:]}
    checkpoint, evaluation = out["train"], out["eval"]
    report = write_report(store, dataset, checkpoint, evaluation, baselines)
    if storage.is_local(report):
        create_link_artifact(key="pipeline-report", link=f"file://{artifacts.local_path(report)}",
                             link_text="pipeline report (HTML)")
    result = {"dataset": dataset, "checkpoint": checkpoint, "eval": evaluation, "report": report}
    if baselines:
        result["baselines"] = {label: {"checkpoint": ck, "eval": ev} for label, (ck, ev) in baselines.items()}
    if ran:  # the plan now finds every stage cached: check that, and remember it for the next no-op
        after = status.reproduce_plan(dataclasses.replace(req, rebuild=None), p, source, subset)
        off = [s for s in names if after[s].artifact != out[s]]
        if off:
            log.warning("after this run the plan disagrees for %s: %s", off, {s: after[s].line() for s in off})
    return result
