"""Prefect flow for pretraining: dataset manifest + TrainConfig -> torchrun -> checkpoint artifact.

The task is cached by (dataset manifest sha256, resolved config, nproc, code version) via
flows.caching; its output folder is content-addressed too (artifacts.stage_root), and a retry of a
killed/timed-out attempt resumes from that folder's `checkpoints/latest` (exact resume), so Prefect
`retries` lose at most `ckpt_every` steps. Two concurrent runs of the same config are serialised by
artifacts.stage_lock on that folder: the second waits and reuses the first's checkpoint.
Published files: checkpoint.pt (load_checkpoint-able), metrics.jsonl, loss_curve.png, config.json,
final_metrics.json.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.caching import refreshing, stage_cache
from slip_core import artifacts, storage
from slip_core.config import ConfigError, from_dict, override, to_dict
from slip_core.failpoints import failpoint
from slip_core.launch import default_threads, plot_loss_curve, run_logged, torchrun_command
from slip_core.trainer import TRAIN_PRESETS, TrainConfig

FILES = ["checkpoint.pt", "metrics.jsonl", "loss_curve.png", "config.json", "final_metrics.json"]
DEFAULT_TIMEOUT_S = {"tiny": 3600.0}  # presets not listed: 14 days
VERIFY_MAX_BYTES = 2 << 30


def make_config(preset: str, config: dict | None) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
    base = TRAIN_PRESETS[preset]
    if not config:
        return base
    dotted = {k: v for k, v in config.items() if "." in k}
    cfg = from_dict(TrainConfig, {**to_dict(base), **{k: v for k, v in config.items() if "." not in k}})
    return override(cfg, dotted) if dotted else cfg


def _check_dataset(url: str) -> artifacts.Manifest:
    """Re-hash a small dataset fully; for a large one (TBs at paper scale) check that every file exists with
    its recorded size — a full re-hash is the dataset stage's job, not something to repeat per training run."""
    m = artifacts.load_manifest(url)
    if sum(f.size for f in m.files) <= VERIFY_MAX_BYTES:
        return artifacts.load_verified(url)
    root = artifacts.artifact_root(artifacts.manifest_url(url))
    bad = [f.path for f in m.files if not storage.exists(storage.join(root, f.path))
           or storage.file_size(storage.join(root, f.path)) != f.size]
    if bad:
        raise artifacts.ManifestError(f"dataset {url}: missing or resized files {bad[:5]}")
    return m


def _work_dir(root: str) -> str:
    """Where torchrun writes: inside the artifact folder when the store is local, else a local cache
    folder keyed the same way (so retries still find checkpoints/latest)."""
    if storage.is_local(root):
        return artifacts.local_path(storage.join(root, "run"))
    return os.path.join(os.path.expanduser("~"), ".cache", "slip-pipeline", "runs", root.rstrip("/").rsplit("/", 1)[-1])


@task(name="pretrain", cache_policy=stage_cache("timeout_s", "resume"), persist_result=True)
def train_task(dataset: str, store: str, config: dict, nproc: int, timeout_s: float, resume: str = "latest") -> str:
    log = get_run_logger()
    cfg = from_dict(TrainConfig, config)
    ds_manifest = _check_dataset(dataset)
    root = artifacts.stage_root(store, "checkpoint", cfg.model.lower(), ds_manifest.sha256, config, nproc)
    if not refreshing() and artifacts.is_complete(root):
        log.info("checkpoint artifact already complete: %s", root)
        return artifacts.manifest_url(root)
    # A concurrent run of the same config shares root and work folder: the second waits here (at most as long
    # as the first may train), then finds the published manifest instead of training into the same folder.
    with artifacts.stage_lock(root, timeout_s=timeout_s, on_wait=log.info):
        if not refreshing() and artifacts.is_complete(root):
            log.info("checkpoint artifact published by a concurrent run: %s", root)
            return artifacts.manifest_url(root)
        return _train_and_publish(root, dataset, ds_manifest, cfg, config, nproc, timeout_s, resume, log)


def _train_and_publish(root: str, dataset: str, ds_manifest: artifacts.Manifest, cfg: TrainConfig, config: dict,
                       nproc: int, timeout_s: float, resume: str, log) -> str:
    work = _work_dir(root)
    if resume == "none" and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    cfg_path = os.path.join(work, "train_config.json")
    storage.atomic_write_text(cfg_path, json.dumps(config, indent=2, sort_keys=True))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(default_threads(nproc, cfg.num_workers)))
    murl = artifacts.manifest_url(root)  # the trainer stops if another run publishes it (not on a forced rebuild)
    cmd = torchrun_command(artifacts.manifest_url(dataset), work, cfg_path, nproc=nproc, resume="latest",
                           published=None if storage.exists(murl) else murl)
    log.info("launching: %s (OMP_NUM_THREADS=%s, timeout %.0fs)", " ".join(cmd), env["OMP_NUM_THREADS"], timeout_s)
    run_logged(cmd, lambda line: log.info("%s", line), timeout_s=timeout_s, env=env)

    final = json.loads(storage.read_text(os.path.join(work, "final_metrics.json")))
    plot_loss_curve(os.path.join(work, "metrics.jsonl"), os.path.join(work, "loss_curve.png"),
                    title=f"{cfg.model} on {ds_manifest.name}")
    storage.atomic_write_text(os.path.join(work, "config.json"), json.dumps(
        {"train": config, "nproc": nproc, "dataset": artifacts.manifest_url(dataset),
         "dataset_sha256": ds_manifest.sha256}, indent=2, sort_keys=True))
    for name in FILES:  # work/ holds the live run; the artifact gets finished copies
        storage.put_file_atomic(os.path.join(work, name), storage.join(root, name))
    failpoint("pretrain.files_copied")  # crash tests (slip_core/failpoints.py)
    m = artifacts.build_manifest(root, FILES, kind="checkpoint", name=cfg.model.lower(),
                                 config={**config, "nproc": nproc},
                                 upstream={"dataset": artifacts.upstream_ref(dataset, ds_manifest)}, metrics=final)
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


@flow(name="pretrain")
def pretrain(dataset: str, store: str, config: dict | None = None, preset: str = "tiny", nproc: int = 1,
             timeout_s: float | None = None, retries: int = 1, resume: str = "latest") -> str:
    """Pretrain on a dataset artifact (manifest URL or folder); returns the checkpoint manifest URL.
    `config`: TrainConfig field overrides over the preset (dotted keys allowed). A failed or timed-out
    attempt is retried `retries` times and resumes from its last checkpoint."""
    log = get_run_logger()
    cfg = to_dict(make_config(preset, config))
    timeout = timeout_s or DEFAULT_TIMEOUT_S.get(preset, 14 * 86400.0)
    run = train_task.with_options(retries=retries, retry_delay_seconds=5)
    url = run(artifacts.manifest_url(dataset), store, cfg, nproc, timeout, resume)
    if artifacts.verify(url):  # cached result whose files were deleted since: train again
        log.warning("cached checkpoint %s no longer verifies; retraining", url)
        create_markdown_artifact(key="rebuilt-checkpoint", description="artifact failed verification",
                                 markdown=f"# checkpoint rebuilt\n\n`{url}` failed verification: "
                                 + "; ".join(artifacts.verify(url)))
        url = run.with_options(refresh_cache=True)(artifacts.manifest_url(dataset), store, cfg, nproc, timeout, resume)
    _report(url)
    log.info("checkpoint: %s", url)
    return url


if __name__ == "__main__":  # python -m flows.pretrain DATASET STORE [preset]
    import sys

    print(pretrain(sys.argv[1], sys.argv[2], preset=sys.argv[3] if len(sys.argv) > 3 else "tiny"))
