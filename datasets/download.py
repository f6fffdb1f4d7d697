"""Running img2dataset on one planned group: its CLI in a subprocess (own process group, timeout), resuming
from the group's completed shards; a process left running by a killed parent is killed first.

The work folder layout and why it survives kill-and-rerun: datasets/work.py. img2dataset is started through
slip_core.procs, so it and its pool workers end when the stage does, however the stage dies.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pyarrow.parquet as pq

from slip_core import artifacts, locks, procs, storage

from datasets.config import DatasetConfig
from datasets.work import Group, done_shards


def img2dataset_command(url_list: str, output_folder: str, cfg: DatasetConfig, extra_columns: list[str],
                        nps: int | None = None) -> list[str]:
    """The img2dataset CLI call (fire flags, plus our two bounds) for a parquet of url, caption + `extra_columns`."""
    a = {
        "url_list": url_list, "input_format": "parquet",
        "url_col": "url", "caption_col": "caption", "save_additional_columns": json.dumps(extra_columns),
        "output_folder": output_folder, "output_format": "webdataset",
        "number_sample_per_shard": nps or cfg.number_sample_per_shard, "oom_shard_count": 5, "incremental_mode": "incremental",
        "image_size": cfg.image_size, "resize_mode": cfg.resize_mode, "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "encode_format": cfg.encode_format, "encode_quality": cfg.encode_quality, "min_image_size": cfg.min_image_size,
        "timeout": cfg.timeout, "download_deadline_s": cfg.download_deadline_s, "max_image_bytes": cfg.max_image_bytes,
        "max_image_pixels": cfg.max_image_pixels,
        "retries": cfg.retries, "compute_hash": cfg.compute_hash or "None",
        "extract_exif": cfg.extract_exif, "processes_count": cfg.processes_count, "thread_count": cfg.thread_count,
        "disallowed_header_directives": json.dumps(list(cfg.disallowed_header_directives)),
        "distributor": cfg.distributor, "enable_wandb": False, "max_shard_retry": 1,
    }
    if cfg.max_image_area:
        a["max_image_area"] = float(cfg.max_image_area)
    if cfg.max_aspect_ratio:
        a["max_aspect_ratio"] = float(cfg.max_aspect_ratio)
    # Both entry points run img2dataset's own CLI with our bounded fetch (download_deadline_s, max_image_bytes);
    # Spark's also builds the session first.
    module = "datasets.img2dataset_spark" if cfg.distributor == "pyspark" else "datasets.img2dataset_bounded"
    return [sys.executable, "-m", module] + [f"--{k}={v}" for k, v in a.items()]


def img2dataset_args(group: Group, cfg: DatasetConfig) -> list[str]:
    inp = storage.join(group.path, "input.parquet")
    extra = [c for c in pq.read_schema(storage.url_to_fs(inp)[0].open(storage.url_to_fs(inp)[1], "rb")).names if c not in ("url", "caption")]
    return img2dataset_command(inp, storage.join(group.path, "out"), cfg, extra, group.nps)


def _kill_stale(group: Group) -> None:
    """Kill an img2dataset process group left by a killed run on this host (its workers would otherwise
    keep writing shards into the folder we are about to resume)."""
    run_url = storage.join(group.path, "run.json")
    if not storage.is_local(run_url) or not storage.exists(run_url):
        return
    info = json.loads(storage.read_text(run_url))
    if info.get("host") != socket.gethostname():
        return
    procs.kill_group_members(int(info["pgid"]), (b"img2dataset", b"multiprocessing"))


def _prepare(group: Group) -> set[int]:
    """Before (re)running a group: its stale processes killed, cut-short stats files and partial shard files
    of a killed run removed. Returns its completed shards."""
    _kill_stale(group)
    out = storage.join(group.path, "out")
    fs, out_p = storage.url_to_fs(out)
    for s in done_shards(group):  # a stats file cut short by a kill does not count
        try:
            json.loads(storage.read_text(storage.join(out, f"{s:05d}_stats.json")))
        except ValueError:
            fs.rm(f"{out_p.rstrip('/')}/{s:05d}_stats.json")
    done = done_shards(group)
    if fs.exists(out_p):  # partial shard files of a killed run: img2dataset will rewrite them
        for p in fs.glob(out_p.rstrip("/") + "/*"):
            base = os.path.basename(p)
            sid = base.split(".")[0].split("_")[0]
            if sid.isdigit() and int(sid) not in done:
                fs.rm(p, recursive=True)
    return done


def _launch(cmd: list[str], groups: list[Group], log_url: str, cfg: DatasetConfig, progress: bool) -> int:
    """Run an img2dataset command for `groups` (subprocess, own process group, timeout; its pid in each
    group's run.json so a rerun kills what a killed run left). Returns its exit code."""
    # PYTHONWARNINGS: runpy's "found in sys.modules" warning for `-m` entry modules (noise)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::RuntimeWarning:runpy")
    for group in groups:  # a work folder removed or taken over: download nothing into it
        locks.ensure_writer(group.path)
    lease = locks.writer_for(groups[0].path)
    log = None if progress or not storage.is_local(log_url) else open(artifacts.local_path(log_url), "ab")
    try:
        # procs.spawn: img2dataset (and, through its own watchdog, its pool workers) dies with this process.
        proc = procs.spawn(cmd, stdout=log or subprocess.DEVNULL, stderr=log, env=env)
        for group in groups:
            storage.atomic_write_text(storage.join(group.path, "run.json"),
                                      json.dumps({"pid": proc.pid, "pgid": proc.pid, "host": socket.gethostname()}))
        try:  # waiting sweeps the process group too: pool workers outliving the main process
            rc = procs.wait(proc, timeout=cfg.subprocess_timeout_s, stop=lease.lost if lease else None)
        except BaseException:
            procs.terminate(proc, grace_s=5.0)
            raise
    finally:
        if log:
            log.close()
    if lease is not None:
        lease.check()  # stopped because the lease was lost: say so
    return rc


def _result(group: Group, t0: float) -> dict:
    out = storage.join(group.path, "out")
    stats = [json.loads(storage.read_text(storage.join(out, f"{s:05d}_stats.json"))) for s in range(group.n_shards)]
    return {"group": group.path, "rows": group.n_rows, "shards": group.n_shards, "seconds": round(time.time() - t0, 2),
            "successes": sum(s["successes"] for s in stats)}


def run_group(group: Group, cfg: DatasetConfig, progress: bool = False) -> dict:
    """Download one group with the img2dataset CLI (subprocess, own process group, timeout), resuming
    from its completed shards. Raises if any shard is still incomplete afterwards."""
    done = _prepare(group)
    t0 = time.time()
    if not done >= set(range(group.n_shards)):
        log_url = storage.join(group.path, "img2dataset.log")
        rc = _launch(img2dataset_args(group, cfg), [group], log_url, cfg, progress)
        missing = sorted(set(range(group.n_shards)) - done_shards(group))
        if rc != 0 or missing:
            raise RuntimeError(f"img2dataset on {group.path} exited {rc}; shards without _stats.json: {missing} "
                               f"(see {log_url}); rerunning resumes them")
    return _result(group, t0)


def run_groups(groups: list[Group], cfg: DatasetConfig, progress: bool = False) -> Iterator[dict]:
    """Download every group; yields each group's result (run_group's) as it completes. With
    distributor "pyspark" all the groups left to download run in ONE Spark application, side by side
    (datasets/img2dataset_spark.py); otherwise group after group."""
    if cfg.distributor != "pyspark":
        for group in groups:
            yield run_group(group, cfg, progress)
        return
    t0 = time.time()
    todo = [g for g in groups if not _prepare(g) >= set(range(g.n_shards))]
    if todo:
        logs = [storage.join(g.path, "img2dataset.log") for g in todo]
        jobs = [{"argv": img2dataset_args(g, cfg)[3:], "log": artifacts.local_path(u) if storage.is_local(u) else None}
                for g, u in zip(todo, logs)]
        fd, jobs_file = tempfile.mkstemp(prefix="slip-spark-jobs-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(jobs, f)
            driver_log = storage.join(os.path.dirname(todo[0].path.rstrip("/")), "spark-driver.log")
            rc = _launch([sys.executable, "-m", "datasets.img2dataset_spark", f"--jobs={jobs_file}"], todo, driver_log,
                         cfg, progress)
        finally:
            os.unlink(jobs_file)
        incomplete = {g.path: sorted(set(range(g.n_shards)) - done_shards(g)) for g in todo}
        incomplete = {p: m for p, m in incomplete.items() if m}
        if rc != 0 or incomplete:
            raise RuntimeError(f"img2dataset on Spark exited {rc}; shards without _stats.json: {incomplete} "
                               f"(see each group's img2dataset.log and {driver_log}); rerunning resumes them")
    for group in groups:
        yield _result(group, t0)
