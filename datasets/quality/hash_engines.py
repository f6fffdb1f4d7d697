"""Where the per-shard perceptual hashing runs: one registry of engines, chosen by one string.

    processes              a local fork process pool (default; SLIP_HASH_WORKERS or one per core)
    dask://HOST:PORT       the workers of a running dask.distributed scheduler (also tcp:// / tls:// addresses)
    spark                  the active SparkSession, else one built from SLIP_SPARK_MASTER / SLIP_SPARK_CONF
                           (datasets.img2dataset_spark.session: the same cluster the pyspark distributor uses)
    spark://HOST:7077      a Spark master (any master URL after `spark:` works too: spark:yarn, spark:local[4])

`map_ordered(fn, args, spec)` runs the same picklable `fn(arg) -> pyarrow.Table` over `args` on the chosen
engine and returns the tables in the order of `args`. Spark hands tables back as Arrow IPC bytes (one
partition per arg), never as Python rows. The engine is an execution setting (DatasetConfig.hash_engine,
in PARALLEL_FIELDS): it never changes what is computed. SLIP_DASK_SCHEDULER=HOST:PORT in the environment
overrides the configured engine (dask at that address), as before the setting existed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable

from slip_core import procs

HASH_WORKERS_ENV = "SLIP_HASH_WORKERS"  # processes for the local pool (default: one per core)
DASK_SCHEDULER_ENV = "SLIP_DASK_SCHEDULER"  # host:port (or tcp://host:port): overrides the configured engine
SPARK_APP_NAME = "slip-fingerprints"


def _local_workers(workers: int | None) -> int:
    return workers or int(os.environ.get(HASH_WORKERS_ENV, "0") or 0) or (os.cpu_count() or 1)


def _run_processes(fn: Callable, args: list, target: str, workers: int | None) -> list:
    workers = _local_workers(workers)
    if workers < 2 or len(args) < 2:
        return [fn(a) for a in args]
    ctx = multiprocessing.get_context("fork")
    # Forked workers hold their own queue's write end, so they would wait forever once we are gone:
    # each follows our pid (slip_core.procs) and ends with us.
    follow = functools.partial(procs.follow_parent, graceful=False, parent=os.getpid())
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(args)), mp_context=ctx, initializer=follow) as pool:
        return list(pool.map(fn, args))


def _run_dask(fn: Callable, args: list, target: str, workers: int | None) -> list:
    from distributed import Client

    with Client(target) as client:  # a client of the running scheduler; the cluster is not ours to stop
        return client.gather(client.map(fn, args, pure=False))


def _to_ipc(fn: Callable, arg) -> bytes:
    """On a Spark worker: fn(arg) as one Arrow IPC stream (the table's buffers, no per-row objects)."""
    import pyarrow as pa

    table = fn(arg)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


@contextlib.contextmanager
def _spark_context(master: str, workers: int | None):
    """The SparkContext to run on: the active session's if there is one (left running), else a session built
    like the pyspark distributor's (datasets.img2dataset_spark.session), stopped afterwards."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    # getActiveSession is per thread; a context started in another thread (a Prefect task) is still the
    # process's one SparkContext, which builder.getOrCreate would return: it is reused and not stopped.
    active = SparkSession.getActiveSession() or SparkContext._active_spark_context
    if active is not None:
        yield active.sparkContext if isinstance(active, SparkSession) else active
        return
    from datasets import img2dataset_spark

    env = {**os.environ, **({"SLIP_SPARK_MASTER": master} if master else {})}
    spark = img2dataset_spark.session([f"--processes_count={_local_workers(workers)}"], environ=env,
                                      app_name=SPARK_APP_NAME)
    try:
        yield spark.sparkContext
    finally:
        spark.stop()


def _run_spark(fn: Callable, args: list, target: str, workers: int | None) -> list:
    with _spark_context(target, workers) as sc:
        blobs = sc.parallelize(args, numSlices=len(args)).map(functools.partial(_to_ipc, fn)).collect()
    return [_from_ipc(b) for b in blobs]


@dataclass(frozen=True)
class HashEngine:
    name: str
    run: Callable  # (fn, args, target, workers) -> results in the order of args
    target: Callable[[str], str]  # the spec -> what `run` connects to ('' = the engine's default)
    usage: str


def _dask_address(spec: str) -> str:
    rest = spec.split("://", 1)[1] if "://" in spec else ""
    if not rest:
        raise ValueError(f"hash engine {spec!r}: name the scheduler, dask://host:port")
    return spec if spec.startswith(("tcp://", "tls://")) else f"tcp://{rest}"


def _spark_master(spec: str) -> str:
    if spec.startswith("spark://"):
        return spec
    return spec.split(":", 1)[1] if ":" in spec else ""


HASH_ENGINES: dict[str, HashEngine] = {
    "processes": HashEngine("processes", _run_processes, lambda spec: "", "processes"),
    "dask": HashEngine("dask", _run_dask, _dask_address, "dask://host:port"),
    "spark": HashEngine("spark", _run_spark, _spark_master, "spark | spark://host:7077 | spark:MASTER"),
}
_SCHEMES = {"tcp": "dask", "tls": "dask"}  # a bare Dask scheduler address


def parse(spec: str) -> tuple[HashEngine, str]:
    """(engine, target) of an engine spec; ValueError (one line, listing the engines) for anything else."""
    name = str(spec).split(":", 1)[0]
    engine = HASH_ENGINES.get(_SCHEMES.get(name, name))
    if engine is None or (engine.name == "processes" and spec != "processes"):
        raise ValueError(f"unknown hash engine {spec!r}: use " + " | ".join(e.usage for e in HASH_ENGINES.values()))
    return engine, engine.target(spec)


def resolve(spec: str = "processes", environ: dict | None = None) -> tuple[HashEngine, str]:
    """parse(spec), unless SLIP_DASK_SCHEDULER names a scheduler: then dask at that address."""
    scheduler = (os.environ if environ is None else environ).get(DASK_SCHEDULER_ENV)
    if scheduler:
        return parse(scheduler if "://" in scheduler else f"dask://{scheduler}")
    return parse(spec)


def map_ordered(fn: Callable, args: list, spec: str = "processes", workers: int | None = None) -> list:
    """[fn(a) for a in args] on the engine `spec` names (see the module docstring); nothing is started or
    contacted when `args` is empty."""
    if not args:
        return []
    engine, target = resolve(spec)
    return engine.run(fn, args, target, workers)
