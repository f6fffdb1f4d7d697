"""Caption table -> img2dataset webdataset shards, with a ledger that gives every input row one fate.

State lives in a work folder per (dataset name, download settings): `<store>/dataset-work/<name>-<hash>/`.

    attempts/0000-<id>/plan.json            written LAST when an attempt is planned (its marker)
    attempts/0000-<id>/g00000/input.parquet  the rows this group hands to img2dataset
    attempts/0000-<id>/g00000/out/           img2dataset's output: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json
    attempts/0000-<id>/g00000/run.json       pid/pgid of the img2dataset process working on it

Why this layout survives kill-and-rerun: img2dataset writes `NNNNN_stats.json` after the shard's tar and
parquet are closed (ENVIRONMENT.md 2.2), so a shard without it is treated as never attempted: its rows
get no status, its partial files are deleted, and img2dataset's own incremental mode (which skips shard
ids that have a `*.json`) redoes exactly those shards of the same, frozen group input. Before resuming, a
still-running img2dataset left behind by a killed parent (its pool workers would finish and write the
shard) is killed by process group. The ledger is never stored as mutable state: it is derived from the
completed shards of all attempts, later attempts overriding earlier ones (retry-failed), so there is
nothing to get out of sync. A row is put into a new attempt only if no complete shard and no pending
attempt holds it, hence no row is downloaded twice and none is lost.

Publishing (datasets/ledger.py) repacks the successful samples of all attempts into contiguous `shards/NNNNN.tar` renamed to
the row's dataset key (img2dataset keys restart in every attempt), deterministically (fixed tar headers).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import artifacts, storage
from slip_core.config import ConfigError, from_dict, to_dict

from datasets import quality as quality_pass  # issue 10: dedup, decontamination, filters

RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}  # img2dataset main.py arguments_validator
STATUSES = ("success", "failed_to_download", "failed_to_resize", "filtered")


@dataclass
class DatasetConfig:
    name: str = "yfcc15m"
    subset_name: str = "openai-yfcc100m-subset"  # which "YFCC15M" (SPEC §1: others differ)
    clean_mode: str = "slip"  # datasets/yfcc.py: "slip" (exact) | "strict"
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset: no | border | keep_ratio | keep_ratio_largest | center_crop
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = 0.0  # 0 = unlimited; a decompression-bomb guard when set
    max_aspect_ratio: float = 0.0  # 0 = unlimited
    timeout: int = 10  # seconds per socket operation (img2dataset): connect, and each read
    # Bounds per image, enforced by our fetch (datasets/img2dataset_bounded.py); 0 = unbounded. The timeout
    # alone bounds neither a server that drips a byte per second nor an endless body. Memory held by
    # downloads is at most ~2 * thread_count * max_image_bytes per process (img2dataset's in-flight cap).
    download_deadline_s: float = 60.0  # total seconds for one image (per retry), redirects included
    max_image_bytes: int = 32 << 20  # response body bytes; a larger Content-Length is refused unread
    max_image_pixels: int = 89_478_485  # width*height from the header, checked before anything decodes (PIL's default cap)
    retries: int = 0
    compute_hash: str = "sha256"
    extract_exif: bool = False
    disallowed_header_directives: tuple = ("noai", "noimageai", "noindex", "noimageindex")
    number_sample_per_shard: int = 10000
    # Parallelism only: not part of the work-folder identity.
    processes_count: int = 16
    thread_count: int = 64
    shards_per_group: int = 64  # one img2dataset call (one mapped Prefect task) per group
    parallel_groups: int = 1
    subprocess_timeout_s: int = 7 * 24 * 3600
    # Dataset quality (datasets/quality.py, issue 10; off by default): applied when publishing, it only turns
    # `success` rows into `filtered` + reason. Not part of the work-folder identity: nothing is re-downloaded.
    quality: quality_pass.QualityConfig = field(default_factory=quality_pass.QualityConfig)
    distributor: str = "multiprocessing"  # img2dataset distributor: multiprocessing | pyspark (datasets/img2dataset_spark.py)

    def __post_init__(self):
        if self.distributor not in ("multiprocessing", "pyspark"):
            raise ValueError(f"DatasetConfig.distributor must be 'multiprocessing' or 'pyspark', got {self.distributor!r}")
        if self.clean_mode not in ("slip", "strict"):
            raise ValueError(f"DatasetConfig.clean_mode must be 'slip' or 'strict', got {self.clean_mode!r}")
        if self.resize_mode not in ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"):
            raise ValueError(f"DatasetConfig.resize_mode: unknown img2dataset resize mode {self.resize_mode!r}")
        for name in ("image_size", "number_sample_per_shard", "processes_count", "thread_count", "shards_per_group",
                     "parallel_groups", "timeout", "subprocess_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"DatasetConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("min_image_size", "max_image_area", "max_aspect_ratio", "retries", "download_deadline_s",
                     "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"DatasetConfig.{name} must be >= 0 (0 = unbounded/off), got {getattr(self, name)!r}")
        if not 0 <= self.encode_quality <= 100:
            raise ValueError(f"DatasetConfig.encode_quality must be in [0, 100], got {self.encode_quality!r}")


DATASET_PRESETS: dict[str, DatasetConfig] = {
    # SLIP's data: OpenAI's YFCC15M subset, short side 256 (SPEC §1 "Images"), 10k samples per shard.
    "yfcc15m": DatasetConfig(),
    # CC3M / CC12M through the same stage (url + caption tables).
    "cc3m": DatasetConfig(name="cc3m", subset_name="", retries=1),
    "cc12m": DatasetConfig(name="cc12m", subset_name="", retries=1),
    # make demo: 64 px squares from a local server, 2 cores.
    "tiny": DatasetConfig(name="demo", subset_name="demo-subset", image_size=64, resize_mode="center_crop",
                          resize_only_if_bigger=False, encode_quality=90, timeout=5, number_sample_per_shard=500,
                          processes_count=2, thread_count=16, shards_per_group=64, max_image_area=4.0e7),
}
_PARALLEL_FIELDS = {"processes_count", "thread_count", "shards_per_group", "parallel_groups", "subprocess_timeout_s", "name", "distributor"}


def make_config(config: dict | None = None, preset: str | None = None) -> DatasetConfig:
    preset = preset or "yfcc15m"
    if preset not in DATASET_PRESETS:
        raise ConfigError(f"unknown dataset preset {preset!r}; known: {sorted(DATASET_PRESETS)}")
    base = to_dict(DATASET_PRESETS[preset])
    base.update(config or {})
    if isinstance(base.get("quality"), str):  # a quality preset name: "off" | "default" | "strict"
        if base["quality"] not in quality_pass.QUALITY_PRESETS:
            raise ConfigError(f"unknown quality preset {base['quality']!r}; known: {sorted(quality_pass.QUALITY_PRESETS)}")
        base["quality"] = to_dict(quality_pass.QUALITY_PRESETS[base["quality"]])
    return from_dict(DatasetConfig, base)


def work_dir(store: str, cfg: DatasetConfig) -> str:
    """Work folder identity = the settings that change what a download produces."""
    ident = {k: v for k, v in to_dict(cfg).items() if k not in _PARALLEL_FIELDS | {"quality"}}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(store, "dataset-work", f"{cfg.name}-{h}")


@contextlib.contextmanager
def work_lock(work: str):
    """Exclusive lock on a local work folder for the whole build: a second build of the same dataset
    (a scheduled rebuild overlapping a manual one) fails fast instead of killing the first one's
    img2dataset as 'stale' or planning the same rows twice. Object stores: no lock (run one at a time)."""
    if not storage.is_local(work):
        yield
        return
    import fcntl

    path = os.path.join(artifacts.local_path(work), ".lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another dataset build holds {path}; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- plan

@dataclass
class Group:
    attempt: str  # attempt folder name, e.g. "0001-3fa2..."
    path: str  # group folder URL
    n_rows: int
    n_shards: int
    nps: int  # img2dataset number_sample_per_shard used for this group


def _fs(url: str):
    return storage.url_to_fs(url)


def _ls_dirs(url: str) -> list[str]:
    fs, p = _fs(url)
    if not fs.exists(p):
        return []
    return sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False) if fs.isdir(x))


def load_groups(attempt_url: str) -> list[Group] | None:
    """Groups of a planned attempt, or None if the attempt was never finished planning."""
    plan_url = storage.join(attempt_url, "plan.json")
    if not storage.exists(plan_url):
        return None
    plan = json.loads(storage.read_text(plan_url))
    name = attempt_url.rstrip("/").rsplit("/", 1)[-1]
    return [Group(name, storage.join(attempt_url, g["name"]), g["n_rows"], g["n_shards"], plan["nps"]) for g in plan["groups"]]


def done_shards(group: Group) -> set[int]:
    fs, p = _fs(storage.join(group.path, "out"))
    if not fs.exists(p):
        return set()
    return {int(os.path.basename(x).split("_")[0]) for x in fs.glob(p.rstrip("/") + "/*_stats.json")}


def group_complete(group: Group) -> bool:
    return done_shards(group) >= set(range(group.n_shards))


def all_attempts(work: str) -> list[tuple[str, list[Group]]]:
    out = []
    for name in _ls_dirs(storage.join(work, "attempts")):
        groups = load_groups(storage.join(work, "attempts", name))
        if groups is not None:
            out.append((name, groups))
    return out


def filter_rows(table: pa.Table) -> pa.Table:
    """key, url, reason for rows never handed to img2dataset (reason '' = downloadable)."""
    keys, urls = table["key"].to_pylist(), table[_url_col(table)].to_pylist()
    seen: set[str] = set()
    reasons = []
    for k, u in zip(keys, urls):
        if not k:
            reasons.append("empty key")
        elif k in seen:
            reasons.append("duplicate key")
        elif not u:
            reasons.append("empty url")
        else:
            scheme = u.split(":", 1)[0].lower() if ":" in u else ""
            reasons.append("" if scheme in ("http", "https") else f"unsupported url scheme '{scheme or u[:20]}'")
        seen.add(k)
    return pa.table({"key": keys, "url": urls, "reason": reasons})


def _url_col(table: pa.Table) -> str:
    from datasets.captions import url_column

    return url_column(table.column_names)


def plan(table_path: str, work: str, cfg: DatasetConfig, retry_failed: bool = False) -> list[Group]:
    """Groups still to download: unfinished groups of earlier attempts (resume) plus, in a new attempt,
    rows no complete shard or pending attempt holds (failed rows too when `retry_failed`)."""
    pending: list[Group] = []
    claimed: set[str] = set()
    fs, attempts_path = _fs(storage.join(work, "attempts"))
    for name in _ls_dirs(storage.join(work, "attempts")):
        groups = load_groups(storage.join(work, "attempts", name))
        if groups is None:  # killed while planning: nothing was downloaded from it
            fs.rm(f"{attempts_path}/{name}", recursive=True)
            continue
        for g in groups:
            if not group_complete(g):
                pending.append(g)
                claimed.update(pq.read_table(storage.join(g.path, "input.parquet"), columns=["sample_id"])["sample_id"].to_pylist())
    from datasets.ledger import collect_ledger  # ledger.py builds on this module

    ledger = collect_ledger(work)
    filt = filter_rows(read_table(table_path, ["key", "url"]))  # the full table is read only if there is work
    status = dict(zip(ledger["key"].to_pylist(), ledger["status"].to_pylist())) if len(ledger) else {}
    take = []
    for i, (k, reason) in enumerate(zip(filt["key"].to_pylist(), filt["reason"].to_pylist())):
        if reason or k in claimed:
            continue
        st = status.get(k)
        if st is None or (retry_failed and st.startswith("failed")):
            take.append(i)
    if take:
        table = read_table(table_path)
        pending.extend(_new_attempt(table.take(pa.array(take, pa.int64())), work, cfg, len(_ls_dirs(storage.join(work, "attempts")))))
    return pending


def _i2d_input(rows: pa.Table) -> pa.Table:
    """Rows as img2dataset input: url, caption, sample_id (our key; 'key' is reserved) + extra columns."""
    ucol = _url_col(rows)
    cols = {"url": rows[ucol], "caption": rows["caption"] if "caption" in rows.column_names else pa.array([""] * len(rows)),
            "sample_id": rows["key"]}
    for c in rows.column_names:
        if c not in RESERVED and c not in (ucol, "key") and c not in cols:
            cols[c] = rows[c]
    return pa.table(cols)


def _new_attempt(rows: pa.Table, work: str, cfg: DatasetConfig, seq: int) -> list[Group]:
    rows = _i2d_input(rows)
    ident = hashlib.sha256("\n".join(rows["sample_id"].to_pylist()).encode()).hexdigest()[:12]
    name = f"{seq:04d}-{ident}"
    attempt = storage.join(work, "attempts", name)
    nps = cfg.number_sample_per_shard
    per_group = nps * cfg.shards_per_group
    groups, meta = [], []
    for gi, start in enumerate(range(0, len(rows), per_group)):
        part = rows.slice(start, per_group)
        gpath = storage.join(attempt, f"g{gi:05d}")
        with storage.atomic_open(storage.join(gpath, "input.parquet"), "wb") as f:
            pq.write_table(part, f)
        n_shards = math.ceil(len(part) / nps)
        groups.append(Group(name, gpath, len(part), n_shards, nps))
        meta.append({"name": f"g{gi:05d}", "n_rows": len(part), "n_shards": n_shards})
    storage.atomic_write_text(storage.join(attempt, "plan.json"),
                              json.dumps({"nps": nps, "rows": len(rows), "groups": meta}, indent=1))
    return groups


def read_table(table_path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = _fs(table_path)
    with fs.open(p, "rb") as f:
        if columns is not None:  # the URL column is `url` or `download_url`
            names = pq.read_schema(f).names
            columns = [c if c != "url" else _url_col_names(names) for c in columns]
        return pq.read_table(f, columns=columns)


def _url_col_names(names: list[str]) -> str:
    from datasets.captions import url_column

    return url_column(names)


# ------------------------------------------------------------------------------------------ download

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


def _img2dataset_args(group: Group, cfg: DatasetConfig) -> list[str]:
    inp = storage.join(group.path, "input.parquet")
    extra = [c for c in pq.read_schema(_fs(inp)[0].open(_fs(inp)[1], "rb")).names if c not in ("url", "caption")]
    return img2dataset_command(inp, storage.join(group.path, "out"), cfg, extra, group.nps)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if our process dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _kill_stale(group: Group) -> None:
    """Kill an img2dataset process group left by a killed run on this host (its workers would otherwise
    keep writing shards into the folder we are about to resume)."""
    run_url = storage.join(group.path, "run.json")
    if not storage.is_local(run_url) or not storage.exists(run_url):
        return
    info = json.loads(storage.read_text(run_url))
    if info.get("host") != socket.gethostname():
        return
    pgid = int(info["pgid"])
    for _ in range(50):
        members = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid and (b"img2dataset" in cmd or b"multiprocessing" in cmd):
                members.append(int(pid))
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def run_group(group: Group, cfg: DatasetConfig, progress: bool = False) -> dict:
    """Download one group with the img2dataset CLI (subprocess, own process group, timeout), resuming
    from its completed shards. Raises if any shard is still incomplete afterwards."""
    _kill_stale(group)
    out = storage.join(group.path, "out")
    fs, out_p = _fs(out)
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
    t0 = time.time()
    if not done >= set(range(group.n_shards)):
        # PYTHONWARNINGS: runpy's "found in sys.modules" warning for `-m` entry modules (noise)
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                   PYTHONWARNINGS="ignore::RuntimeWarning:runpy")
        log_url = storage.join(group.path, "img2dataset.log")
        log = None if progress or not storage.is_local(log_url) else open(artifacts.local_path(log_url), "ab")
        proc = subprocess.Popen(_img2dataset_args(group, cfg), stdout=log or subprocess.DEVNULL, stderr=log,
                                start_new_session=True, preexec_fn=_die_with_parent, env=env)
        storage.atomic_write_text(storage.join(group.path, "run.json"),
                                  json.dumps({"pid": proc.pid, "pgid": proc.pid, "host": socket.gethostname()}))
        try:
            rc = proc.wait(timeout=cfg.subprocess_timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if log:
                log.close()
            _kill_stale(group)  # pool workers outliving the main process
        missing = sorted(set(range(group.n_shards)) - done_shards(group))
        if rc != 0 or missing:
            raise RuntimeError(f"img2dataset on {group.path} exited {rc}; shards without _stats.json: {missing} "
                               f"(see {log_url}); rerunning resumes them")
    stats = [json.loads(storage.read_text(storage.join(out, f"{s:05d}_stats.json"))) for s in range(group.n_shards)]
    return {"group": group.path, "rows": group.n_rows, "shards": group.n_shards, "seconds": round(time.time() - t0, 2),
            "successes": sum(s["successes"] for s in stats)}
