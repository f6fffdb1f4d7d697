"""Prefect flow for evaluation: checkpoint (manifest or .pt) + eval config -> eval artifact.

Each (task, dataset) is one cached task keyed by checkpoint sha256 + dataset fingerprint (sha256 of its
files) + the eval settings + task source + code version (flows.caching), so re-evaluating after adding a
dataset only runs the new pair. Published files: results.json (flat records, evaluation.tasks),
report.md, report.html, results.png; Prefect table + markdown artifacts show the same.
"""
from __future__ import annotations

import functools
import json

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from datasets import prompts, retrieval_sets
from evaluation import common, report
from evaluation.presets import EVAL_PRESETS
from evaluation.tasks import TASKS, EvalConfig, run_task
from flows.caching import refreshing, stage_cache
from slip_core import artifacts, storage
from slip_core.config import ConfigError, from_dict, override, to_dict
from slip_core.failpoints import failpoint

FILES = ["results.json", "report.md", "report.html", "results.png"]
__all__ = ["evaluate", "EVAL_PRESETS", "make_config"]


def make_config(preset: str, config: dict | None) -> EvalConfig:
    if preset not in EVAL_PRESETS:
        raise ConfigError(f"unknown eval preset {preset!r}; choose from {sorted(EVAL_PRESETS)}")
    base, config = EVAL_PRESETS[preset], config or {}
    cfg = from_dict(EvalConfig, {**to_dict(base), **{k: v for k, v in config.items() if "." not in k}})
    dotted = {k: v for k, v in config.items() if "." in k}
    return override(cfg, dotted) if dotted else cfg


@task(name="eval-dataset-fingerprint")
def dataset_fingerprint(task_name: str, dataset: str, data_root: str | None, reference_prompts: str | None = None) -> str:
    from datasets import catalog

    if task_name == "retrieval":
        try:
            return retrieval_sets.fingerprint(dataset, data_root)
        except FileNotFoundError:
            return "missing"  # the eval task records the explanation
    try:
        reference = prompts.load_reference(reference_prompts)
        catalog.ensure(dataset, data_root, reference)
        return catalog.fingerprint(dataset, data_root, reference=reference)
    except FileNotFoundError:
        return "missing"  # the eval task records the explanation


@functools.lru_cache(maxsize=1)
def _model(path: str, sha256: str) -> common.LoadedModel:
    lm = common.load_model(path)
    if lm.sha256 != sha256:
        raise RuntimeError(f"{path} changed while being evaluated")
    return lm


@task(name="eval", cache_policy=stage_cache("checkpoint"), persist_result=True)
def eval_one(checkpoint: str, checkpoint_sha256: str, task_name: str, dataset: str, dataset_sha256: str,
             settings: dict, reference_prompts_sha256: str = "") -> dict:
    """One (task, dataset) record; a missing dataset or an inapplicable task is recorded, not raised.
    reference_prompts_sha256 keys the cache on the contents of SLIP's prompt files, not on their folder name."""
    from datasets.catalog import DatasetMissing
    from evaluation.zeroshot import NotApplicable

    log = get_run_logger()
    lm = _model(checkpoint, checkpoint_sha256)
    cfg = from_dict(EvalConfig, settings)
    try:
        rec = run_task(task_name, lm, dataset, cfg, dataset_sha256, log=log.info)
    except (DatasetMissing, NotApplicable) as e:
        log.warning("%s/%s not evaluated: %s", task_name, dataset, e)
        return {"dataset": dataset, "task": task_name, "model": lm.name, "checkpoint_sha256": lm.sha256,
                "metric": None, "value": None, "reason": str(e).splitlines()[0] if str(e) else type(e).__name__,
                "detail": str(e)}
    log.info("%s/%s: %s = %.2f (chance %.2f)", task_name, dataset, rec["metric"], rec["value"], rec["chance"])
    return rec


def _pretrain_info(manifest_url: str | None) -> dict:
    """Pretraining set/epochs of a checkpoint artifact, for matching paper configurations."""
    if not manifest_url:
        return {}
    m = artifacts.load_manifest(manifest_url)
    up = m.upstream.get("dataset")
    name = artifacts.load_manifest(up.url).name if up and storage.exists(up.url) else ""
    return {"epochs": m.config.get("epochs"), "dataset": name.lower() or None}


@flow(name="evaluate")
def evaluate(checkpoint: str, store: str, config: dict | None = None, preset: str = "tiny") -> str:
    """Evaluate a checkpoint (manifest URL/folder or a .pt file, ours or released SLIP); returns the eval
    manifest URL. `config`: EvalConfig overrides over the preset (dotted keys allowed)."""
    log = get_run_logger()
    cfg = make_config(preset, config)
    ckpt_path, ckpt_manifest = common.resolve_checkpoint(checkpoint)
    ckpt_sha = storage.sha256_file(ckpt_path)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in TASKS}  # what one job's number depends on
    reference = prompts.load_reference(cfg.reference_prompts)  # a bad folder fails here, before any task
    ref_sha = reference.sha256 if reference else ""
    jobs = cfg.jobs()
    shas = {(t, d): dataset_fingerprint(t, d, cfg.data_root, cfg.reference_prompts) for t, d in jobs}
    model = _model(ckpt_path, ckpt_sha).name  # the same load serves the eval tasks below
    root = artifacts.stage_root(store, "eval", model.lower(), ckpt_sha, to_dict(cfg), sorted(shas.items()),
                                *([ref_sha] if ref_sha else []))
    # A concurrent run of the same evaluation waits here; its tasks then come from Prefect's cache and it
    # reuses the published artifact instead of writing the same folder at the same time.
    with artifacts.stage_lock(root, on_wait=log.info):
        results = []
        for t, d in jobs:
            results.append(eval_one(ckpt_path, ckpt_sha, t, d, shas[(t, d)], settings, ref_sha))
            failpoint("eval.result")  # crash tests (slip_core/failpoints.py)
        if not refreshing() and artifacts.is_complete(root):  # same checkpoint, data, settings published intact
            log.info("eval artifact already complete: %s", root)
            return artifacts.manifest_url(root)
        url, md, title, n_ok = _publish(root, results, model, preset, cfg, ckpt_path, ckpt_sha, ckpt_manifest)
    create_table_artifact(key="eval-results", table=[{c: r.get(c) for c in report.RESULT_COLS + ["reason"]}
                                                      for r in results], description=f"{title}: one row per (task, dataset)")
    create_markdown_artifact(key="eval-report", markdown=md, description=title)
    log.info("eval artifact: %s (%d results, %d not evaluated)", url, n_ok, len(results) - n_ok)
    return url


def _publish(root: str, results: list[dict], model: str, preset: str, cfg: EvalConfig, ckpt_path: str,
             ckpt_sha: str, ckpt_manifest: str | None) -> tuple[str, str, str, int]:
    """Write the eval files and publish the manifest; returns (manifest URL, markdown, title, results with a value)."""
    pretrain = _pretrain_info(ckpt_manifest)
    lineage = artifacts.format_lineage(ckpt_manifest) if ckpt_manifest else f"checkpoint file {ckpt_path}"
    title = f"Evaluation of {model} ({preset})"
    md = report.to_markdown(results, title, pretrain, lineage)
    ok = [r for r in results if r.get("value") is not None]
    png = report.figure_png(report.bar_figure(ok)) if ok else b""
    storage.atomic_write_text(storage.join(root, "results.json"), json.dumps(results, indent=2))
    storage.atomic_write_text(storage.join(root, "report.md"), md)
    storage.atomic_write_text(storage.join(root, "report.html"), report.to_html(results, title, pretrain, lineage, png))
    storage.atomic_write_bytes(storage.join(root, "results.png"), png)
    upstream = {"checkpoint": artifacts.upstream_ref(ckpt_manifest)} if ckpt_manifest else {}
    metrics = {f"{r['task']}/{r['dataset']}": r["value"] for r in ok}
    m = artifacts.build_manifest(root, FILES, kind="eval", name=model.lower(),
                                 config={**to_dict(cfg), "preset": preset, "checkpoint_sha256": ckpt_sha,
                                         "checkpoint": ckpt_manifest or ckpt_path},
                                 upstream=upstream, metrics=metrics)
    return artifacts.publish(m, root), md, title, len(ok)
