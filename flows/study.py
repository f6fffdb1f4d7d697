"""`slip study`: the paper's Table 2 over several seeds, as one Prefect flow of ordinary cached stages.

On one dataset artifact (the reproduce preset's, built or found by flows/build_dataset.py), for every seed:
each method of flows.presets.STUDY_METHODS (tiny: SLIP, CLIP, SimCLR) is pretrained with that seed at the
same schedule and evaluated with the preset's evaluation; then the second method (CLIP) once more with as
many steps as fit in the first method's (SLIP's) measured wall time of that seed: CLIP's cost per step is
about half SLIP's, so this arm asks whether SLIP's gain is more than its extra compute. Every run is a
checkpoint and an eval artifact named by its stage identity, so a second call trains and evaluates nothing.
The report (study.json, study.md: mean ± std per method and metric, with the training cost) is its own
artifact, upstream of every checkpoint and eval it summarises.
"""
from __future__ import annotations

import contextlib
import json
import math

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from evaluation import comparison
from flows import status
from flows.presets import STUDY_METHODS, reproduce_preset
from slip_core import artifacts, identity, storage
from slip_core.config import ConfigError
from slip_core.store import Store

REPORT_CODE = (comparison.__name__,)


def walltime_config(config: dict, main_ckpt: str, other_ckpt: str) -> tuple[dict, int]:
    """Train overrides giving the `other` run as many steps as fit in the `main` run's wall time (measured
    train_time_s of both at equal steps), at least as many as it had: (config, target steps). Full epochs
    where the target is a whole number of them; else `max_steps` stops the longer schedule there."""
    main, other = (artifacts.load_manifest(u).metrics for u in (main_ckpt, other_ckpt))
    ratio = float(main["train_time_s"]) / max(float(other["train_time_s"]), 1e-9)
    target = max(int(other["steps"]), round(int(other["steps"]) * ratio))
    epochs = int(artifacts.load_manifest(other_ckpt).config["epochs"])
    per_epoch = int(other["total_steps"]) // max(epochs, 1)
    new_epochs = max(epochs, math.ceil(target / per_epoch))
    return {**config, "epochs": new_epochs, "max_steps": 0 if target == new_epochs * per_epoch else target}, target


def _dataset(preset: str, store: str, req: status.Request, p) -> str:
    from flows.build_dataset import build_dataset

    source, subset, corpus = status.demo_source(req, p, build=True)
    if source is None:
        raise ConfigError(f"preset {preset!r} needs --source (YFCC100M metadata or a url+caption table)")
    plan = status.reproduce_plan(req, p, source, subset)["dataset"]
    if plan.state == "cached":  # nothing to download: no server (its fixed port may be another demo's)
        return plan.artifact
    with corpus.serve() if corpus is not None else contextlib.nullcontext():
        return build_dataset(source=source, store=store, subset=subset, preset=p.dataset, config=req.dataset_config)


def write_study_report(store: str, runs: list[dict], summary: list[dict], seeds: int) -> str:
    """study.json + study.md as a report artifact whose upstream is every run's checkpoint and eval."""
    ups = {}
    for i, r in enumerate(runs):
        ups[f"checkpoint-{i}"] = artifacts.upstream_ref(r["checkpoint"])
        ups[f"eval-{i}"] = artifacts.upstream_ref(r["eval"])
    ident = identity.stage("report", "study", {k: u.sha256 for k, u in ups.items()}, {"seeds": seeds}, REPORT_CODE)
    st = Store(store)
    root = st.stage_root(ident)
    md = f"# Study: {seeds} seed(s) per method, mean ± std\n\n" + comparison.to_markdown(summary)
    with st.lock(root):
        if not artifacts.is_complete(root):
            storage.atomic_write_text(storage.join(root, "study.json"),
                                      json.dumps({"seeds": seeds, "summary": summary, "runs": runs}, indent=1))
            storage.atomic_write_text(storage.join(root, "study.md"), md + "\n")
            artifacts.publish(artifacts.build_manifest(root, ["study.json", "study.md"], kind="report", name="study",
                                                       upstream=ups, identity=ident.to_dict()), root)
    return artifacts.manifest_url(root)


@flow(name="study")
def study(preset: str = "tiny", seeds: int = 3, store: str = "out/store", train_config: dict | None = None,
          eval_config: dict | None = None, demo_corpus: dict | None = None, dataset_config: dict | None = None,
          nproc: int = 1, source: str | None = None, subset: str | None = None) -> dict:
    """Returns {"report": study manifest URL, "markdown": the table, "runs": one row per (method, seed)}."""
    from flows.evaluate import evaluate
    from flows.pretrain import pretrain

    log = get_run_logger()
    if preset not in STUDY_METHODS:
        raise ConfigError(f"no study methods for preset {preset!r}; choose from {sorted(STUDY_METHODS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    p = reproduce_preset(preset)
    req = status.Request(preset, store, source, subset, None, dataset_config, train_config, eval_config, demo_corpus, nproc)
    dataset = _dataset(preset, store, req, p)
    methods = STUDY_METHODS[preset]
    runs: list[dict] = []

    def arm(label: str, train_preset: str, seed: int, config: dict) -> dict:
        ckpt = pretrain(dataset=dataset, store=store, preset=train_preset, config=config, nproc=nproc)
        ev = evaluate(checkpoint=ckpt, store=store, preset=p.eval, config=eval_config)
        row = {**comparison.arm_row(ckpt, ev, label), "seed": seed, "checkpoint": ckpt, "eval": ev}
        log.info("seed %d %s: %s", seed, label, {k: round(v, 2) for k, v in row["results"].items()})
        runs.append(row)
        return row

    for seed in range(seeds):
        cfg = {**(train_config or {}), "seed": seed}
        done = [arm(label.upper(), tp, seed, cfg) for label, tp in methods]
        if len(methods) > 1:  # the baseline again, at the first method's wall time
            (_, tp), first, second = methods[1], done[0], done[1]
            wcfg, target = walltime_config(cfg, first["checkpoint"], second["checkpoint"])
            log.info("seed %d: %s at %s's wall time = %d steps", seed, second["method"], first["method"], target)
            arm(f"{second['method']} @ {first['method']} wall time", tp, seed, wcfg)
    summary = comparison.aggregate(runs)
    report = write_study_report(store, runs, summary, seeds)
    md = storage.read_text(storage.join(artifacts.artifact_root(report), "study.md"))
    create_markdown_artifact(key="study", markdown=md, description=f"{preset}: {seeds} seeds per method, mean ± std")
    return {"report": report, "markdown": md, "runs": runs}
