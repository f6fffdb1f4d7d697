"""Prefect flow for evaluation: checkpoint (manifest or .pt) + eval config -> eval artifact.

Stage identity (`eval_identity`): the checkpoint (its manifest's sha256, or the file's for a bare .pt), the
fingerprint of every eval dataset (and of SLIP's prompt files when used), the resolved EvalConfig, and the
code of evaluation's tasks + report with what they import. Each (task, dataset) is one cached task keyed by
checkpoint sha256 + dataset fingerprint + the eval settings + the eval code identity (flows.caching), so
re-evaluating after adding a dataset only runs the new pair, and an edit in evaluation code reruns
evaluation only. Published files: results.json (flat records, evaluation.tasks), report.md, report.html,
results.png; Prefect table + markdown artifacts show the same.
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
from flows import launch_pool  # noqa: F401  (registers the work-pool launcher for the fine-tune)
from flows.caching import refreshing, stage_cache
from slip_core import artifacts, identity, storage
from slip_core.config import from_dict, resolve, to_dict
from slip_core.failpoints import failpoint
from slip_core.progress import Progress
from slip_core.store import Store

FILES = ["results.json", "report.md", "report.html", "results.png"]
EVAL_CODE = (run_task.__module__, report.__name__, common.__name__)  # the evaluation stage's code
__all__ = ["evaluate", "EVAL_PRESETS", "make_config", "eval_identity"]


def make_config(preset: str, config: dict | None = None) -> EvalConfig:
    return resolve(EVAL_PRESETS, preset, config, what="eval")


def eval_identity(name: str, checkpoint_sha256: str, cfg: EvalConfig, data: dict[tuple[str, str], str],
                  reference_prompts_sha256: str = "") -> identity.StageIdentity:
    """Identity of an evaluation: checkpoint (manifest sha256, or file sha256 for a bare .pt), eval data
    fingerprints by (task, dataset), SLIP's prompt files when used, resolved config."""
    inputs = {"checkpoint": checkpoint_sha256, **{f"{t}/{d}": s for (t, d), s in sorted(data.items())}}
    if reference_prompts_sha256:
        inputs["reference_prompts"] = reference_prompts_sha256
    return identity.stage("eval", name, inputs, cfg.identity_settings(), EVAL_CODE)


def data_fingerprint(task_name: str, dataset: str, data_root: str | None, reference_prompts: str | None = None,
                     prepare: bool = True) -> str:
    """sha256 identifying an eval dataset's files, or "missing". `prepare`: materialise a local offline set
    first (the flow does; `slip status` does not, so it never writes)."""
    from datasets import catalog

    if task_name == "retrieval":
        try:
            return retrieval_sets.fingerprint(dataset, data_root)
        except FileNotFoundError:
            return "missing"  # the eval task records the explanation
    try:
        reference = prompts.load_reference(reference_prompts)
        if prepare:
            catalog.ensure(dataset, data_root, reference)
        return catalog.fingerprint(dataset, data_root, reference=reference)
    except FileNotFoundError:
        return "missing"  # the eval task records the explanation


def data_files(task_name: str, dataset: str, data_root: str | None, reference_prompts: str | None = None) -> list[str]:
    """The paths `data_fingerprint` reads (files or folders), for the no-op check's stamp."""
    from datasets import catalog

    paths = [str(catalog.data_root(data_root) / dataset)] + ([reference_prompts] if reference_prompts else [])
    try:
        if task_name == "retrieval":
            split = retrieval_sets.load(dataset, data_root)
            return sorted(split.shards if split.images is None else split.images) + paths
        ref = prompts.load_reference(reference_prompts)
        where = ref.catalog.get(dataset) if ref is not None else None
        return paths + ([str(where["path"])] if where else [])
    except FileNotFoundError:
        return paths


@task(name="eval-dataset-fingerprint")
def dataset_fingerprint(task_name: str, dataset: str, data_root: str | None, reference_prompts: str | None = None) -> str:
    return data_fingerprint(task_name, dataset, data_root, reference_prompts)


def checkpoint_input(ckpt_path: str, ckpt_manifest: str | None, ckpt_sha: str | None = None) -> tuple[str, str]:
    """(eval artifact name, checkpoint input hash) of a checkpoint: from its manifest when it is an artifact
    (name = the model, sha256 = the manifest's, so a retrained checkpoint is a new input even if its bytes are
    the same), else from the file."""
    if ckpt_manifest:
        m = artifacts.load_manifest(ckpt_manifest)
        return m.name.lower(), m.sha256
    sha = ckpt_sha or storage.sha256_file(ckpt_path)
    return _model(ckpt_path, sha).name.lower(), sha


@functools.lru_cache(maxsize=1)
def _model(path: str, sha256: str) -> common.LoadedModel:
    lm = common.load_model(path)
    if lm.sha256 != sha256:
        raise RuntimeError(f"{path} changed while being evaluated")
    return lm


@task(name="eval", cache_policy=stage_cache(EVAL_CODE, "checkpoint"), persist_result=True)
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
    ckpt_path, ckpt_manifest = common.resolve_checkpoint(checkpoint, cfg.which, log=log.warning)
    ckpt_sha = storage.sha256_file(ckpt_path)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in TASKS}  # what one job's number depends on
    reference = prompts.load_reference(cfg.reference_prompts)  # a bad folder fails here, before any task
    ref_sha = reference.sha256 if reference else ""
    jobs = cfg.jobs()
    shas = {(t, d): dataset_fingerprint(t, d, cfg.data_root, cfg.reference_prompts) for t, d in jobs}
    model = _model(ckpt_path, ckpt_sha).name  # the same load serves the eval tasks below
    ident = eval_identity(*checkpoint_input(ckpt_path, ckpt_manifest, ckpt_sha), cfg, shas, ref_sha)
    st = Store(store)
    log.info("eval: %s", st.status(ident).line())
    root = st.stage_root(ident)
    # A concurrent run of the same evaluation waits here; its tasks then come from Prefect's cache and it
    # reuses the published artifact instead of writing the same folder at the same time.
    with st.lock(root, on_wait=log.info):
        results = []
        with Progress("eval", len(jobs), "datasets", log=log.info) as bar:  # a bar on a terminal, else lines
            for t, d in jobs:
                results.append(eval_one(ckpt_path, ckpt_sha, t, d, shas[(t, d)], settings, ref_sha))
                r = results[-1]
                bar.update(1, last=f"{t}/{d} " + (f"{r['value']:.1f}" if r.get("value") is not None else "not evaluated"))
                failpoint("eval.result")  # crash tests (slip_core/failpoints.py)
        if not refreshing() and artifacts.is_complete(root):  # same checkpoint, data, settings published intact
            log.info("eval artifact already complete: %s", root)
            return artifacts.manifest_url(root)
        url, md, title, n_ok = _publish(root, results, model, preset, cfg, ckpt_path, ckpt_sha, ckpt_manifest, ident)
    create_table_artifact(key="eval-results", table=[{c: r.get(c) for c in report.RESULT_COLS + ["reason"]}
                                                      for r in results], description=f"{title}: one row per (task, dataset)")
    create_markdown_artifact(key="eval-report", markdown=md, description=title)
    log.info("eval artifact: %s (%d results, %d not evaluated)", url, n_ok, len(results) - n_ok)
    return url


def _publish(root: str, results: list[dict], model: str, preset: str, cfg: EvalConfig, ckpt_path: str,
             ckpt_sha: str, ckpt_manifest: str | None, ident: identity.StageIdentity) -> tuple[str, str, str, int]:
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
    m = artifacts.build_manifest(root, FILES, kind="eval", name=ident.name, identity=ident.to_dict(),
                                 config={**to_dict(cfg), "preset": preset, "checkpoint_sha256": ckpt_sha,
                                         "checkpoint": ckpt_manifest or ckpt_path,
                                         "checkpoint_file": ckpt_path.rsplit("/", 1)[-1]},
                                 upstream=upstream, metrics=metrics)
    return artifacts.publish(m, root), md, title, len(ok)
