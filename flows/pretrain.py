"""Prefect flow for pretraining: dataset manifest + TrainConfig -> torchrun -> checkpoint artifact.

Stage identity (`train_identity`): the dataset manifest's sha256, the resolved config and nproc, the code of
slip_core.launch + slip_core.trainer and everything they import, and those modules' library versions.
The output folder is named by it (Store.stage_root) and the Prefect task is cached on the same things
(flows.caching). A retry of a killed/timed-out attempt resumes from that folder's `checkpoints/latest`
(exact resume), so Prefect `retries` lose at most `ckpt_every` steps; a run under a *new* identity starts
fresh unless `resume_from` names a checkpoint of another run to continue (recorded in the manifest as the
upstream `resumed_from`). Two concurrent runs of the same identity are serialised by the stage lock on that
folder: the second waits and reuses the first's checkpoint.
Published files: checkpoint.pt (load_checkpoint-able), metrics.jsonl, loss_curve.png, config.json,
final_metrics.json, and checkpoint_best.pt (weights at the best in-training evaluation: the trainer runs as
`python -m evaluation.train_entry`, evaluation/in_training.py) when an evaluation ran; the manifest's metrics
name the final step (`steps`) and the best one (`best_step`, `best_metric`, `best_value`, `best_dataset`).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import launch_pool  # noqa: F401  (registers the work-pool launcher)
from flows.caching import refreshing, stage_cache
from slip_core import artifacts, identity, launchers, progress, storage
from slip_core.config import from_dict, resolve, to_dict
from slip_core.failpoints import failpoint
from slip_core.launch import default_threads, plot_loss_curve, torchrun_command, trainer_args
from slip_core.store import Store
from slip_core.train_config import TRAIN_PRESETS, TrainConfig
from slip_core.train_state import latest_checkpoint

FILES = ["checkpoint.pt", "metrics.jsonl", "loss_curve.png", "config.json", "final_metrics.json"]
BEST_FILE = "checkpoint_best.pt"  # published too when the run kept one (slip_core.trainer.BEST_FILE)
DEFAULT_TIMEOUT_S = {"tiny": 3600.0}  # presets not listed: 14 days
# The training stage's code: the launcher and the entry it runs as `python -m` (named here as well: the
# launcher only names it in a string): the trainer with in-training evaluation, with everything they import.
TRAIN_ENTRY = "evaluation.train_entry"
TRAIN_CODE = (torchrun_command.__module__, "slip_core.trainer", TRAIN_ENTRY)
# Not entered: in-training evaluation only watches the run (weights are bit-identical with it on or off,
# tests/test_in_training_eval.py), so a fix in evaluation code reruns the eval stage, never a pretraining
# (issue 16). The checkpoint's manifest still records the whole repo's code_version for lineage.
TRAIN_MONITORS = ("evaluation.in_training",)
RESUMED_FROM = "resumed_from.json"  # in the run folder: which checkpoint of another run this one started from


def make_config(preset: str, config: dict | None = None) -> TrainConfig:
    return resolve(TRAIN_PRESETS, preset, config, what="training")


def train_identity(dataset_sha256: str, config: dict, nproc: int) -> identity.StageIdentity:
    """Identity of a pretraining run: dataset manifest sha256, resolved TrainConfig (dict) and world size."""
    return identity.stage("checkpoint", str(config["model"]).lower(), {"dataset": dataset_sha256},
                          {**config, "nproc": nproc}, TRAIN_CODE, stop=TRAIN_MONITORS)


def _check_dataset(url: str, store: Store) -> artifacts.Manifest:
    """The dataset manifest, if its files are intact (Store.check)."""
    m = artifacts.load_manifest(url)
    problems = store.check(url, m)
    if problems:
        raise artifacts.ManifestError(f"dataset {url} does not verify: " + "; ".join(problems[:5]))
    return m


def resume_checkpoint(ref: str, store: Store) -> str:
    """The checkpoint file (weights + optimizer + data position: a TrainState) `--resume-from` names: a .pt
    file, a run folder (its checkpoints/latest), a checkpoint stage folder whose run is unfinished (its run
    folder's checkpoints/latest), or a published checkpoint artifact (folder or manifest: its checkpoint.pt)."""
    from slip_core.checkpoint import load_state

    s = str(ref).rstrip("/")
    if s.endswith(".pt"):
        path = s
    else:
        folder = artifacts.artifact_root(s) if s.endswith(".json") else s
        found = [latest_checkpoint(d) for d in (folder, store.run_dir(folder))]
        if storage.exists(artifacts.manifest_url(folder)):
            found += [storage.join(folder, f.path) for f in artifacts.load_verified(folder).files
                      if f.path == "checkpoint.pt"]
        path = next((p for p in found if p), None)
        if path is None:
            raise FileNotFoundError(f"--resume-from {ref}: no checkpoints/latest there or in its run folder, and "
                                    "no checkpoint artifact")
    if "train_state" not in load_state(path):
        raise ValueError(f"--resume-from {path}: not a resume checkpoint (no train_state: weights only)")
    return path


def _seed_run(work: str, resume_from: str, log) -> None:
    """Start a fresh run folder from another run's checkpoint: the trainer then resumes from it as from its own."""
    if latest_checkpoint(work):
        return  # this run has checkpoints of its own: continue those
    name = os.path.basename(resume_from)
    os.makedirs(os.path.join(work, "checkpoints"), exist_ok=True)
    _copy(resume_from, os.path.join(work, "checkpoints", name))
    metrics = resume_from.rsplit("/", 2)[0] + "/metrics.jsonl"
    if storage.exists(metrics):  # the curve continues (the trainer truncates it to the checkpoint's step)
        _copy(metrics, os.path.join(work, "metrics.jsonl"))
    storage.atomic_write_text(os.path.join(work, RESUMED_FROM), json.dumps(
        {"url": resume_from, "sha256": storage.sha256_file(resume_from)}))
    storage.atomic_write_text(os.path.join(work, "checkpoints", "latest"), name)
    log.info("continuing from %s (--resume-from)", resume_from)


def _copy(url: str, local: str) -> None:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as src, storage.atomic_open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, storage.CHUNK)


@task(name="pretrain", cache_policy=stage_cache(TRAIN_CODE, "timeout_s", "resume", "resume_from", "launcher",
                                                         stop=TRAIN_MONITORS),
      persist_result=True)
def train_task(dataset: str, store: str, config: dict, nproc: int, timeout_s: float, resume: str = "latest",
               resume_from: str | None = None, launcher: dict | None = None) -> str:
    """`nproc`: ranks per node; the identity has the world size the launcher makes of it (not the launcher)."""
    log = get_run_logger()
    st = Store(store)
    ds_manifest = _check_dataset(dataset, st)
    world = launchers.world_size(launcher, nproc)
    root = st.stage_root(train_identity(ds_manifest.sha256, config, world))
    if not refreshing() and artifacts.is_complete(root):
        return _reuse(root, "already complete", resume_from, log)
    # A concurrent run of the same identity shares root and work folder: the second waits here (at most as long
    # as the first may train), then finds the published manifest instead of training into the same folder.
    with st.lock(root, timeout_s=timeout_s, on_wait=log.info):
        if not refreshing() and artifacts.is_complete(root):
            return _reuse(root, "published by a concurrent run", resume_from, log)
        return _train_and_publish(st, root, dataset, ds_manifest, config, nproc, timeout_s, resume, resume_from, log,
                                  launcher)


def _reuse(root: str, why: str, resume_from: str | None, log) -> str:
    log.info("checkpoint artifact %s: %s%s", why, root,
             " (--resume-from not used: this identity is already trained)" if resume_from else "")
    return artifacts.manifest_url(root)


def _train_and_publish(store: Store, root: str, dataset: str, ds_manifest: artifacts.Manifest, config: dict,
                       nproc: int, timeout_s: float, resume: str, resume_from: str | None, log,
                       launcher: dict | None = None) -> str:
    cfg = from_dict(TrainConfig, config)
    work = store.run_dir(root)
    if resume == "none" and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    if resume_from:
        _seed_run(work, resume_checkpoint(resume_from, store), log)
    cfg_path = os.path.join(work, "train_config.json")
    storage.atomic_write_text(cfg_path, json.dumps(config, indent=2, sort_keys=True))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(default_threads(nproc, cfg.num_workers)))
    murl = artifacts.manifest_url(root)  # the trainer stops if another run publishes it (not on a forced rebuild)
    args = trainer_args(artifacts.manifest_url(dataset), work, cfg_path, resume="latest",
                        published=None if storage.exists(murl) else murl)
    job = launchers.TrainerJob(TRAIN_ENTRY, tuple(args), log_dir=work, nproc=nproc, name=f"slip-{cfg.model}",
                               env={"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]})
    launchers.launch(job, launcher, timeout_s, progress.relay(lambda line: log.info("%s", line)))
    nproc = launchers.world_size(launcher, nproc)  # what config.json and the identity record

    final = json.loads(storage.read_text(os.path.join(work, "final_metrics.json")))
    plot_loss_curve(os.path.join(work, "metrics.jsonl"), os.path.join(work, "loss_curve.png"),
                    title=f"{cfg.model} on {ds_manifest.name}")
    storage.atomic_write_text(os.path.join(work, "config.json"), json.dumps(
        {"train": config, "nproc": nproc, "dataset": artifacts.manifest_url(dataset),
         "dataset_sha256": ds_manifest.sha256}, indent=2, sort_keys=True))
    files = FILES + ([BEST_FILE] if os.path.exists(os.path.join(work, BEST_FILE)) else [])
    for name in files:  # work/ holds the live run; the artifact gets finished copies
        storage.put_file_atomic(os.path.join(work, name), storage.join(root, name))
    failpoint("pretrain.files_copied")  # crash tests (slip_core/failpoints.py)
    upstream = {"dataset": artifacts.upstream_ref(dataset, ds_manifest)}
    seeded = os.path.join(work, RESUMED_FROM)
    if os.path.exists(seeded):  # lineage: this run continued another run's checkpoint on purpose
        r = json.loads(storage.read_text(seeded))
        upstream["resumed_from"] = artifacts.Upstream(url=r["url"], sha256=r["sha256"], kind=artifacts.RESUME_KIND)
    ident = train_identity(ds_manifest.sha256, config, nproc)
    m = artifacts.build_manifest(root, files, kind="checkpoint", name=cfg.model.lower(),
                                 config={**config, "nproc": nproc}, upstream=upstream, metrics=final,
                                 identity=ident.to_dict())
    url = artifacts.publish(m, root)
    shutil.rmtree(work, ignore_errors=True)  # resume state and copies are no longer needed
    return url


def _report(url: str) -> None:
    m = artifacts.load_manifest(url)
    root = artifacts.artifact_root(url)
    png = storage.read_bytes(storage.join(root, "loss_curve.png"))
    skip = {"skipped"}
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in m.metrics.items() if k not in skip)
    md = "\n".join([
        f"# Pretraining `{m.name}`", "",
        f"checkpoint manifest: `{url}` (sha256 {m.sha256[:12]}, code {m.code_version})",
        f"dataset: `{m.upstream['dataset'].url}` (sha256 {m.upstream['dataset'].sha256[:12]})", "",
        f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})", "",
        "| metric | value |", "|---|---|", rows, "",
        f"skipped samples: {m.metrics.get('skipped', {})}"])
    key = re.sub(r"[^a-z0-9-]+", "-", f"pretrain-{m.name}".lower())
    create_markdown_artifact(key=key, markdown=md, description="pretraining summary: loss curve and final metrics")


def explain(dataset: str, store: str, config: dict | None = None, preset: str = "tiny", nproc: int = 1,
            launcher: dict | None = None) -> str:
    """`cached: URL` or `will run: reasons` for this training run (the same identity the task computes)."""
    try:
        ds_sha = artifacts.load_manifest(dataset).sha256
    except artifacts.ManifestError as e:
        return f"will run: {e}"
    world = launchers.world_size(launcher, nproc)
    return Store(store).status(train_identity(ds_sha, to_dict(make_config(preset, config)), world)).line()


@flow(name="pretrain")
def pretrain(dataset: str, store: str, config: dict | None = None, preset: str = "tiny", nproc: int = 1,
             timeout_s: float | None = None, retries: int = 1, resume: str = "latest",
             resume_from: str | None = None, launcher: dict | None = None) -> str:
    """Pretrain on a dataset artifact (manifest URL or folder); returns the checkpoint manifest URL.
    `config`: TrainConfig field overrides over the preset (dotted keys allowed). A failed or timed-out
    attempt is retried `retries` times and resumes from its last checkpoint. `resume_from`: continue from a
    checkpoint of another run (another identity: e.g. after a logging fix), see resume_checkpoint().
    `launcher`: where the ranks run, {"kind": "local" | "slurm" | "work-pool", **settings} (slip_core/launchers.py);
    an execution setting, not part of the identity (the world size it makes of `nproc` is)."""
    log = get_run_logger()
    cfg = to_dict(make_config(preset, config))
    dataset = artifacts.manifest_url(dataset)
    launchers.resolve_launcher(launcher)  # a bad launcher config fails here, before anything runs
    log.info("train: %s", explain(dataset, store, config, preset, nproc, launcher))
    timeout = timeout_s or DEFAULT_TIMEOUT_S.get(preset, 14 * 86400.0)
    run = train_task.with_options(retries=retries, retry_delay_seconds=5)
    url = run(dataset, store, cfg, nproc, timeout, resume, resume_from, launcher)
    if artifacts.verify(url):  # cached result whose files were deleted since: train again
        log.warning("cached checkpoint %s no longer verifies; retraining", url)
        create_markdown_artifact(key="rebuilt-checkpoint", description="artifact failed verification",
                                 markdown=f"# checkpoint rebuilt\n\n`{url}` failed verification: "
                                 + "; ".join(artifacts.verify(url)))
        url = run.with_options(refresh_cache=True)(dataset, store, cfg, nproc, timeout, resume, resume_from, launcher)
    _report(url)
    log.info("checkpoint: %s", url)
    return url


if __name__ == "__main__":  # python -m flows.pretrain DATASET STORE [preset]
    import sys

    print(pretrain(sys.argv[1], sys.argv[2], preset=sys.argv[3] if len(sys.argv) > 3 else "tiny"))
