"""img2dataset on Spark: `python -m datasets.img2dataset_spark <img2dataset CLI flags>`.

The dataset stage runs this instead of `python -m datasets.img2dataset_bounded` when
`DatasetConfig.distributor` is "pyspark" (download.img2dataset_command). Why a wrapper: img2dataset's
pyspark distributor uses the *active* SparkSession and otherwise builds its own `local[processes_count]`
session with a fixed 16 GB driver (img2dataset/distributor.py), which can neither reach a cluster nor be
sized. Here the session is built first, from the environment, and img2dataset's own CLI then runs in the
same process and picks it up, through datasets/img2dataset_bounded.run (the same bounded fetch as without
Spark). Everything else (sharding, key numbering, per-shard `_stats.json` markers, incremental resume) is
img2dataset's, so the shards and the ledger are the same as with the multiprocessing distributor
(tests/test_scale_spark.py checks this).

Environment (all optional):
    SLIP_SPARK_MASTER   Spark master URL: spark://host:7077, k8s://https://..., yarn.
                        Default local[processes_count] (one Python worker per core of this machine).
    SLIP_SPARK_CONF     JSON dict of extra Spark settings, e.g. '{"spark.executor.memory": "8g",
                        "spark.executor.instances": "64"}'; they override the defaults below.

On a cluster the executors need this environment installed (same Python + img2dataset, e.g. the project's
container image) and the store must be shared storage (s3://..., a shared mount): executors write the
shards straight into the work folder. `subjob_size` (img2dataset, default 1000 shards per Spark job)
bounds how many shards one job schedules.
"""
from __future__ import annotations

import json
import os
import sys

# Defaults for the driver: small, because in this pipeline the driver only plans shards and collects
# (status, row) pairs; downloads run in the Python workers / executors.
DEFAULT_CONF = {
    "spark.app.name": "slip-img2dataset",  # also marks the JVM for download._kill_stale's command-line scan
    "spark.driver.memory": "1g",
    "spark.ui.enabled": "false",  # no port 4040 races between concurrent builds on one host
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
}
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _flag(argv, "distributor", "pyspark") != "pyspark":
        raise SystemExit("datasets.img2dataset_spark runs img2dataset with --distributor=pyspark only")
    # The JVM (py4j) is in our process group and exits when its stdin (from us) closes; Spark's Python
    # daemon exits when the JVM does. So following our parent and killing our group leaves nothing behind.
    from slip_core import procs

    procs.follow_parent(graceful=False)
    # Spark's Python workers must be this interpreter (the one with img2dataset), not `python3` on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for k, v in spark_conf(argv).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    print(f"img2dataset_spark: Spark {spark.version}, master {spark.sparkContext.master}, "
          f"driver memory {spark.conf.get('spark.driver.memory')}", flush=True)
    try:
        from datasets import img2dataset_bounded  # img2dataset's CLI with the per-image bounds, as without Spark

        img2dataset_bounded.run(argv)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
