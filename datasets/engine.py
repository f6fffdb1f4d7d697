"""The dataset stage's table engine: DuckDB, set up in one place.

Why DuckDB: at YFCC15M size the ledger is a join of a 15M-row input table with img2dataset's per-shard
parquet outputs, plus group-bys for every summary. DuckDB runs these out of core under a fixed memory
budget (hash joins, aggregates and sorts spill to `temp_directory`) and streams results to parquet, so
resident memory does not grow with the number of rows. Nothing here builds a Python object per row.

Every path handed to SQL goes through `path()`: local paths as they are, other fsspec URLs (s3://,
memory://, ...) through the fsspec filesystem registered on the connection (no DuckDB extension is
downloaded). Values are bound as parameters or quoted with `lit()`, never pasted raw into SQL.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import duckdb
import pyarrow as pa

from slip_core import storage

# Engine budget: the memory DuckDB's buffer manager may hold before it spills. Fixed, not proportional to
# the table: that is what keeps the ledger's peak RSS flat from 1M to 15M rows (bench/dataset_scale.py).
MEMORY_LIMIT = os.environ.get("SLIP_DUCKDB_MEMORY", "512MB")
# Arrow's default allocator (mimalloc) keeps freed pages resident, so the quality pass's transients (hash
# tables and sort buffers over millions of keys, each freed before the next is built) would add up in RSS;
# the system allocator returns large blocks at once (dedup of 1.5M hashes: peak RSS 827 MB with mimalloc,
# 699 MB with it). ARROW_DEFAULT_MEMORY_POOL, when set, is the user's choice and is kept.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.system_memory_pool())
THREADS = int(os.environ.get("SLIP_DUCKDB_THREADS", "0")) or min(os.cpu_count() or 1, 8)
BATCH_ROWS = 1 << 16
_REGISTERED: dict[int, set] = {}


@contextlib.contextmanager
def connect(temp_dir: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with the stage's memory budget; spills go to `temp_dir` (a fresh
    temp folder by default) and are deleted on exit."""
    with tempfile.TemporaryDirectory(prefix="slip-duckdb-", dir=temp_dir) as tmp:
        con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "threads": THREADS, "temp_directory": tmp,
                                     # every query whose order matters says ORDER BY; not keeping insertion
                                     # order otherwise lets joins and scans stream (DuckDB's advice for memory)
                                     "preserve_insertion_order": False,
                                     "autoinstall_known_extensions": False, "autoload_known_extensions": False})
        con.execute("SET enable_progress_bar = false")
        _REGISTERED[id(con)] = set()  # fsspec protocols registered on this connection
        try:
            yield con
        finally:
            _REGISTERED.pop(id(con), None)
            con.close()


def path(con: duckdb.DuckDBPyConnection, url: str) -> str:
    """`url` as DuckDB can open it: a local path, or a URL served by its fsspec filesystem."""
    url = str(url)
    if storage.is_local(url):
        return os.path.abspath(storage.url_to_fs(url)[1])
    fs, _ = storage.url_to_fs(url)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    done = _REGISTERED.setdefault(id(con), set())
    if proto not in done:
        con.register_filesystem(fs)
        done.add(proto)
    return url


def lit(value: str) -> str:
    """A SQL string literal (for the places DuckDB takes no parameter: file lists of table functions)."""
    return "'" + str(value).replace("'", "''") + "'"


def file_list(con: duckdb.DuckDBPyConnection, urls: list[str]) -> str:
    """`[...]` list literal of paths for read_parquet."""
    return "[" + ", ".join(lit(path(con, u)) for u in urls) + "]"


def copy_to_parquet(con: duckdb.DuckDBPyConnection, sql: str, url: str, params: list | None = None) -> None:
    """Stream the result of `sql` into the parquet file `url`, atomically (storage.atomic_open), zstd. Written
    by one thread: the same rows give the same bytes (parallel writers may cut row groups differently)."""
    threads = scalar(con, "SELECT current_setting('threads')")
    with tempfile.TemporaryDirectory(prefix="slip-copy-") as tmp:
        local = os.path.join(tmp, "out.parquet")
        con.execute("SET threads = 1")
        try:
            con.execute(f"COPY ({sql}) TO {lit(local)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)",
                        params or [])
        finally:
            con.execute(f"SET threads = {int(threads)}")
        storage.put_file_atomic(local, url)


def batches(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None,
            rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The result of `sql` as Arrow record batches of at most `rows` rows (streamed, not materialised)."""
    reader = con.sql(sql, params=params or None).to_arrow_reader(rows)
    yield from reader


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


def hash_text_column(con: duckdb.DuckDBPyConnection, sql: str, h, params: list | None = None) -> int:
    """Feed the one string column of `sql`'s rows, in order, into hashlib object `h` (each value's UTF-8 bytes,
    concatenated: callers end every value with a separator). Streams; returns the number of rows."""
    n = 0
    for batch in batches(con, sql, params):
        col = batch.column(0)
        if len(col) == 0:
            continue
        offsets_buf, data_buf = col.buffers()[1], col.buffers()[2]
        width = 8 if pa.types.is_large_string(col.type) else 4
        offs = memoryview(offsets_buf).cast("B")
        first = int.from_bytes(offs[col.offset * width:(col.offset + 1) * width], "little", signed=True)
        last = int.from_bytes(offs[(col.offset + len(col)) * width:(col.offset + len(col) + 1) * width], "little", signed=True)
        if data_buf is not None:
            h.update(memoryview(data_buf)[first:last])
        n += len(col)
    return n
