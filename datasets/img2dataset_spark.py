"""img2dataset on Spark: every shard group of a build in ONE Spark application.

    python -m datasets.img2dataset_spark --jobs=JOBS.json     # [{"argv": [img2dataset CLI flags], "log": path}, ...]
    python -m datasets.img2dataset_spark <img2dataset CLI flags>   # one group

The dataset stage runs this instead of `python -m datasets.img2dataset_bounded` when
`DatasetConfig.distributor` is "pyspark" (datasets/download.py: run_groups starts it once for all the
groups left to download). The SparkSession is built first, from the environment (img2dataset would
otherwise build its own `local[processes_count]` session with a fixed 16 GB driver, which can neither
reach a cluster nor be sized), and each group's img2dataset CLI then runs in its own thread of this
process against that one session, through datasets/img2dataset_bounded.run (the same bounded fetch as
without Spark). The groups' Spark jobs run side by side in the one application (fair scheduler pool), so
the executors stay busy while one group's driver thread plans its shards or writes its stats. Everything
else (sharding, key numbering, per-shard `_stats.json` markers, incremental resume) is img2dataset's, so
the shards and the ledger are the same as with the multiprocessing distributor (tests/test_scale_spark.py).

Three things make img2dataset's CLI run in a thread: its pyspark distributor asks for the *active*
session, which is thread-local in Spark, and would otherwise make (and at the end stop) one of its own, so
its session helper is pointed at ours; it installs a SIGINT handler, which only the main thread may do
(the main thread's own handling stays); and its progress prints go to the group's `log` (stdout and stderr
are routed per thread).

Environment (all optional):
    SLIP_SPARK_MASTER   Spark master URL: spark://host:7077, k8s://https://..., yarn.
                        Default local[processes_count] (one Python worker per core of this machine).
    SLIP_SPARK_CONF     JSON dict of extra Spark settings, e.g. '{"spark.executor.memory": "8g",
                        "spark.executor.instances": "64"}'; they override the defaults below.
    SLIP_SPARK_GROUPS   how many groups' img2dataset drivers run at once (default 16; each also runs
                        img2dataset's stats-logger process); the rest start as those finish.

On a cluster the executors need this environment installed (same Python + img2dataset, e.g. the project's
container image) and the store must be shared storage (s3://..., a shared mount): executors write the
shards straight into the work folder. `subjob_size` (img2dataset, default 1000 shards per Spark job)
bounds how many shards one job schedules.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import types

# Defaults for the driver: small, because in this pipeline the driver only plans shards and collects
# (status, row) pairs; downloads run in the Python workers / executors.
DEFAULT_CONF = {
    "spark.app.name": "slip-img2dataset",  # also marks the JVM for download._kill_stale's command-line scan
    "spark.driver.memory": "1g",
    "spark.ui.enabled": "false",  # no port 4040 races between concurrent builds on one host
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
    "spark.scheduler.mode": "FAIR",  # the groups' jobs share the executors instead of queueing behind each other
}
MAX_CONCURRENT_GROUPS = int(os.environ.get("SLIP_SPARK_GROUPS", 16))
LOCAL_CONF = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}


def _flag(argv: list[str], name: str, default: str) -> str:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def spark_conf(argv: list[str], environ: dict | None = None) -> dict[str, str]:
    """The Spark settings this run uses: defaults, the master, then SLIP_SPARK_CONF."""
    env = os.environ if environ is None else environ
    master = env.get("SLIP_SPARK_MASTER") or f"local[{_flag(argv, 'processes_count', '1')}]"
    conf = {**DEFAULT_CONF, **(LOCAL_CONF if master.startswith("local") else {}), "spark.master": master}
    extra = env.get("SLIP_SPARK_CONF")
    if extra:
        try:
            extra = json.loads(extra)
        except ValueError as e:
            raise SystemExit(f"SLIP_SPARK_CONF is not a JSON object: {e}") from e
        if not isinstance(extra, dict):
            raise SystemExit("SLIP_SPARK_CONF must be a JSON object of Spark settings")
        conf.update({str(k): str(v) for k, v in extra.items()})
    return conf


class _ThreadStreams(io.TextIOBase):
    """sys.stdout / sys.stderr stand-in: writes go to the current thread's file, else to the original."""

    def __init__(self, original):
        self.original, self.local = original, threading.local()

    def write(self, text: str) -> int:
        target = getattr(self.local, "file", None) or self.original
        target.write(text)
        return len(text)

    def flush(self) -> None:
        (getattr(self.local, "file", None) or self.original).flush()


def session(argv: list[str], environ: dict | None = None, app_name: str | None = None):
    """The one SparkSession of this process, built from the environment (`environ`, default os.environ);
    the quality pass's Spark hash engine builds its session here too (datasets/quality/hash_engines.py)."""
    # Spark's Python workers must be this interpreter (the one with img2dataset), not `python3` on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    conf = spark_conf(argv, environ)
    if app_name:
        conf["spark.app.name"] = app_name
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _share(spark) -> None:
    """Make img2dataset (in any thread) use `spark` and leave it running; SIGINT handlers from the main
    thread only."""
    import importlib

    distributor = importlib.import_module("img2dataset.distributor")
    i2d_main = importlib.import_module("img2dataset.main")  # the module: the package exports a `main` function

    @contextlib.contextmanager
    def shared_session(processes_count):  # img2dataset's helper would look up the thread's active session
        yield spark

    distributor._spark_session = shared_session

    def main_thread_signal(signum, handler):
        if threading.current_thread() is threading.main_thread():
            return signal.signal(signum, handler)
        return None

    i2d_main.signal = types.SimpleNamespace(**{**vars(signal), "signal": main_thread_signal})


def run_jobs(jobs: list[dict], spark) -> list[str | None]:
    """Each job's img2dataset CLI in its own thread against `spark`; per job None (done) or the error."""
    from datasets import img2dataset_bounded  # img2dataset's CLI with the per-image bounds, as without Spark

    _share(spark)
    app = spark.sparkContext.applicationId
    streams = [_ThreadStreams(sys.stdout), _ThreadStreams(sys.stderr)]
    sys.stdout, sys.stderr = streams

    def one(job: dict) -> str | None:
        log = open(job["log"], "a", buffering=1) if job.get("log") else None
        for s in streams:
            s.local.file = log
        try:
            print(f"img2dataset_spark: Spark {spark.version}, master {spark.sparkContext.master}, "
                  f"driver memory {spark.conf.get('spark.driver.memory')}, application {app}; "
                  f"group started {time.time():.3f}", flush=True)
            spark.sparkContext.setLocalProperty("spark.scheduler.pool", f"group-{threading.get_ident()}")
            img2dataset_bounded.run(job["argv"])
            print(f"img2dataset_spark: group finished {time.time():.3f}", flush=True)
            return None
        except BaseException as e:  # noqa: BLE001 - fire's SystemExit included: one group's failure is reported
            print(f"img2dataset_spark: group failed: {type(e).__name__}: {e}", flush=True)
            return f"{type(e).__name__}: {e}"
        finally:
            for s in streams:
                s.local.file = None
            if log:
                log.close()

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), MAX_CONCURRENT_GROUPS))) as pool:
            return list(pool.map(one, jobs))
    finally:
        sys.stdout, sys.stderr = streams[0].original, streams[1].original


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    jobs_file = _flag(argv, "jobs", "")
    jobs = json.loads(open(jobs_file).read()) if jobs_file else [{"argv": argv, "log": None}]
    for job in jobs:
        if _flag(job["argv"], "distributor", "pyspark") != "pyspark":
            raise SystemExit("datasets.img2dataset_spark runs img2dataset with --distributor=pyspark only")
    # The JVM (py4j) is in our process group and exits when its stdin (from us) closes; Spark's Python
    # daemon exits when the JVM does. So following our parent and killing our group leaves nothing behind.
    from slip_core import procs

    procs.follow_parent(graceful=False)
    spark = session(jobs[0]["argv"] if jobs else [])
    print(f"img2dataset_spark: application {spark.sparkContext.applicationId}, {len(jobs)} group(s)", flush=True)
    try:
        errors = run_jobs(jobs, spark)
    finally:
        spark.stop()
    failed = [(j.get("log"), e) for j, e in zip(jobs, errors) if e]
    for log, e in failed:
        print(f"img2dataset_spark: a group failed ({log}): {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
