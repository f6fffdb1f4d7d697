"""The ledger: every input row's one recorded fate, derived from the work folder (datasets/work.py).

Built in the table engine (datasets/engine.py, DuckDB) from the caption table, the rows its parser found
malformed (`malformed.parquet` of the caption-table artifact) and img2dataset's per-shard parquet outputs
of every attempt: joins and group-bys out of core under a fixed memory budget, streamed to parquet, never
a Python object per row. Later attempts override earlier ones (that is how --retry-failed merges); a row of
a completed shard that img2dataset wrote no record for is `failed_to_download` ("no record in img2dataset
output"); rows never handed to img2dataset carry the reason (`filter_reason_sql`); a row with no fate yet
stops the build (the download is incomplete). Columns: LEDGER_SCHEMA. `source` names the img2dataset
sample of a success ('<group path>|<shard id>|<img2dataset key>'); `line_number` is the row's line in the
metadata when the source has one (YFCC, and every malformed row: those have no key).

    with engine.connect() as con:
        n = build_ledger(con, table, work)      # temp table `ledger`, in input order
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slip_core import storage

from datasets import engine
from datasets.sources.captions import url_column
from datasets.work import all_attempts, done_shards

STATUSES = ("success", "failed_to_download", "failed_to_resize", "filtered")
LEDGER_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                           ("error", pa.string()),
                           ("attempt", pa.string()), ("source", pa.string()), ("shard", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32()), ("line_number", pa.int64())])
LEDGER_COLUMNS = ", ".join(LEDGER_SCHEMA.names)
MALFORMED_FILE = "malformed.parquet"  # line_number, reason: next to a caption table (datasets/sources)

# Python's str.isspace() set (what str.strip() / splitlines() use), spelled for RE2 (DuckDB's regexes).
_WS = "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace())
_LINE_BREAKS = "".join(f"\\x{{{ord(c):x}}}" for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def reason_sql(err: str) -> str:
    """SQL for a short, aggregatable reason from img2dataset's error string `err` (the raw one is kept in
    `error`): the first line of the stripped message, at most 200 characters, with two messages renamed."""
    stripped = f"regexp_replace({err}, '^[{_WS}]+|[{_WS}]+$', '', 'g')"
    return (f"CASE WHEN contains({err}, '!buf.empty()') THEN 'empty response (0 bytes)' "
            f"WHEN contains({err}, 'infinite loop') THEN 'redirect loop' "
            f"WHEN {stripped} = '' THEN {err} "
            f"ELSE substring(regexp_extract({stripped}, '^[^{_LINE_BREAKS}]*'), 1, 200) END")


def filter_reason_sql(key: str, url: str, first: str) -> str:
    """SQL for why a caption-table row is never handed to img2dataset ('' = downloadable); `first` is true
    for the first row holding its key (a later row with the same key is a duplicate)."""
    scheme = f"lower(split_part({url}, ':', 1))"
    return (f"CASE WHEN {key} IS NULL OR {key} = '' THEN 'empty key' WHEN NOT {first} THEN 'duplicate key' "
            f"WHEN {url} IS NULL OR {url} = '' THEN 'empty url' "
            f"WHEN contains({url}, ':') AND {scheme} IN ('http', 'https') THEN '' "
            f"ELSE 'unsupported url scheme ''' || CASE WHEN contains({url}, ':') AND {scheme} <> '' THEN {scheme} "
            f"ELSE substring({url}, 1, 20) END || '''' END")


# ------------------------------------------------------------------------------------------- inputs

def table_columns(con: duckdb.DuckDBPyConnection, table_path: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({engine.lit(engine.path(con, table_path))})").fetchall()]


def register_input(con: duckdb.DuckDBPyConnection, table_path: str) -> None:
    """Temp view `inp` (rn, key, url, line_number) over the caption table, with `reason` from the filter rules.
    The table is scanned, never loaded: `first` comes from a group-by on key (spills when large)."""
    cols = table_columns(con, table_path)
    ucol = url_column(cols)
    line = "CAST(line_number AS BIGINT)" if "line_number" in cols else "CAST(NULL AS BIGINT)"
    src = engine.lit(engine.path(con, table_path))
    con.execute(f"""CREATE OR REPLACE TEMP VIEW inp_raw AS
        SELECT file_row_number AS rn, CAST(key AS VARCHAR) AS key, CAST("{ucol}" AS VARCHAR) AS url,
               {line} AS line_number
        FROM read_parquet({src}, file_row_number=true)""")
    con.execute("""CREATE OR REPLACE TEMP TABLE first_rows AS
        SELECT key, min(rn) AS first_rn FROM inp_raw GROUP BY key""")
    con.execute(f"""CREATE OR REPLACE TEMP VIEW inp AS
        SELECT r.rn, r.key, r.url, r.line_number,
               {filter_reason_sql('r.key', 'r.url', 'r.rn = f.first_rn')} AS reason
        FROM inp_raw r JOIN first_rows f ON r.key IS NOT DISTINCT FROM f.key""")


def register_work(con: duckdb.DuckDBPyConnection, work: str) -> None:
    """Temp tables of the work folder's inventory (one row per group / completed shard, not per sample):
    `groups` (gid, seq, attempt, gpath, nps, input file) and `shards` (gid, seq, shard, out file)."""
    g_rows, s_rows = [], []
    for seq, (attempt, groups) in enumerate(all_attempts(work)):
        for g in groups:
            gid = len(g_rows)
            g_rows.append((gid, seq, attempt, g.path, g.nps, engine.path(con, storage.join(g.path, "input.parquet"))))
            s_rows += [(gid, seq, s, engine.path(con, storage.join(g.path, "out", f"{s:05d}.parquet")))
                       for s in sorted(done_shards(g))]
    groups = pa.table({n: pa.array([r[i] for r in g_rows], t) for i, (n, t) in enumerate(
        [("gid", pa.int32()), ("seq", pa.int32()), ("attempt", pa.string()), ("gpath", pa.string()),
         ("nps", pa.int64()), ("in_file", pa.string())])})
    shards = pa.table({n: pa.array([r[i] for r in s_rows], t) for i, (n, t) in enumerate(
        [("gid", pa.int32()), ("seq", pa.int32()), ("shard", pa.int64()), ("out_file", pa.string())])})
    for name, t in (("groups", groups), ("shards", shards)):
        con.register(f"{name}_arrow", t)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
        con.unregister(f"{name}_arrow")


def register_fates(con: duckdb.DuckDBPyConnection, work: str) -> None:
    """Temp table `fates` (key, status, reason, error, seq, gid, src_shard, i2d_key, width, height): the latest
    attempt's record of every row some complete shard holds. Compact: paths live in `groups`, once."""
    register_work(con, work)
    out_files = [r[0] for r in con.execute("SELECT out_file FROM shards ORDER BY seq, gid, shard").fetchall()]
    in_files = [r[0] for r in con.execute("SELECT in_file FROM groups g WHERE EXISTS "
                                          "(SELECT 1 FROM shards s WHERE s.gid = g.gid)").fetchall()]
    if not out_files:
        con.execute("""CREATE OR REPLACE TEMP TABLE fates (key VARCHAR, status VARCHAR, reason VARCHAR, error VARCHAR,
            seq INTEGER, gid INTEGER, src_shard BIGINT, i2d_key VARCHAR, width INTEGER, height INTEGER)""")
        return
    err = "CASE WHEN o.status = 'success' THEN '' ELSE coalesce(nullif(o.error_message, ''), o.status) END"
    con.execute(f"""CREATE OR REPLACE TEMP VIEW records AS
        SELECT CAST(o.sample_id AS VARCHAR) AS key, o.status, {err} AS error, s.seq, s.gid, s.shard,
               CAST(o.key AS VARCHAR) AS i2d_key, CAST(o.width AS INTEGER) AS width, CAST(o.height AS INTEGER) AS height
        FROM read_parquet({'[' + ', '.join(map(engine.lit, out_files)) + ']'}, filename=true, union_by_name=true) o
        JOIN shards s ON o.filename = s.out_file""")
    # rows of a completed shard without a record: img2dataset caught an exception and wrote nothing
    con.execute(f"""CREATE OR REPLACE TEMP VIEW norecord AS
        SELECT CAST(i.sample_id AS VARCHAR) AS key, s.seq, s.gid, s.shard
        FROM read_parquet({'[' + ', '.join(map(engine.lit, in_files)) + ']'}, filename=true, file_row_number=true) i
        JOIN groups g ON i.filename = g.in_file
        JOIN shards s ON s.gid = g.gid AND s.shard = i.file_row_number // g.nps
        WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.gid = s.gid AND r.shard = s.shard
                          AND r.key = CAST(i.sample_id AS VARCHAR))""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE fates AS
        SELECT key, v.status, v.reason, v.error, v.seq, v.gid, v.src_shard, v.i2d_key, v.width, v.height
        FROM (SELECT key, arg_max(struct_pack(status, reason, error, seq, gid, src_shard, i2d_key, width, height), seq) AS v
              FROM (SELECT key, status, {reason_sql('error')} AS reason, error, seq, gid, shard AS src_shard, i2d_key,
                           width, height FROM records
                    UNION ALL
                    SELECT key, 'failed_to_download', 'no record in img2dataset output', '', seq, gid, shard, NULL,
                           NULL, NULL FROM norecord)
              GROUP BY key)""")


def register_malformed(con: duckdb.DuckDBPyConnection, malformed_path: str | None) -> None:
    """Temp view `malformed` (line_number, reason): rows the table parser could not read."""
    if malformed_path and storage.exists(malformed_path):
        con.execute(f"""CREATE OR REPLACE TEMP VIEW malformed AS SELECT CAST(line_number AS BIGINT) AS line_number,
            CAST(reason AS VARCHAR) AS reason FROM read_parquet({engine.lit(engine.path(con, malformed_path))})""")
    else:
        con.execute("CREATE OR REPLACE TEMP VIEW malformed AS SELECT CAST(NULL AS BIGINT) AS line_number, "
                    "CAST(NULL AS VARCHAR) AS reason WHERE false")


# ------------------------------------------------------------------------------------------- ledger

def build_ledger(con: duckdb.DuckDBPyConnection, table_path: str, work: str, malformed_path: str | None = None) -> int:
    """Temp table `ledger` with one row per input row, in output order `ord` (input rows, then malformed lines),
    and the views `ledger_v` (+ attempt, source, gpath) and `ledger_out` (LEDGER_SCHEMA, + url) over it; returns
    the row count. Raises while a downloadable row has no status yet. Per row the table holds the key, the
    fate and small integers (group id, shard): URLs and paths are joined in only when a view is read."""
    register_input(con, table_path)
    register_fates(con, work)
    register_malformed(con, malformed_path)
    con.execute("""CREATE OR REPLACE TEMP TABLE ledger AS
        SELECT i.rn AS ord, i.key,
               CASE WHEN i.reason <> '' THEN 'filtered' ELSE f.status END AS status,
               CASE WHEN i.reason <> '' THEN i.reason ELSE f.reason END AS reason,
               CASE WHEN i.reason <> '' THEN '' ELSE f.error END AS error,
               '' AS shard,
               CASE WHEN i.reason <> '' THEN NULL ELSE f.width END AS width,
               CASE WHEN i.reason <> '' THEN NULL ELSE f.height END AS height,
               i.line_number,
               CASE WHEN i.reason <> '' THEN NULL ELSE f.gid END AS gid,
               CASE WHEN i.reason <> '' THEN NULL ELSE f.src_shard END AS src_shard,
               CASE WHEN i.reason <> '' THEN NULL ELSE f.i2d_key END AS i2d_key
        FROM inp i LEFT JOIN fates f ON i.reason = '' AND f.key = i.key
        UNION ALL
        SELECT (SELECT count(*) FROM inp_raw) + line_number, NULL, 'filtered', 'malformed row: ' || reason, '',
               '', NULL, NULL, line_number, NULL, NULL, NULL FROM malformed""")
    con.execute("DROP TABLE fates")
    con.execute("DROP TABLE first_rows")
    con.execute("""CREATE OR REPLACE TEMP VIEW ledger_v AS
        SELECT l.*, coalesce(g.attempt, '') AS attempt, g.gpath,
               CASE WHEN l.i2d_key IS NULL THEN '' ELSE g.gpath || '|' || l.src_shard || '|' || l.i2d_key END AS source
        FROM ledger l LEFT JOIN groups g ON g.gid = l.gid""")
    con.execute("""CREATE OR REPLACE TEMP VIEW ledger_out AS
        SELECT v.*, u.url FROM ledger_v v LEFT JOIN inp_raw u ON u.rn = v.ord""")
    missing = con.execute("SELECT key FROM ledger WHERE status IS NULL ORDER BY ord LIMIT 5").fetchall()
    if missing:
        n = engine.scalar(con, "SELECT count(*) FROM ledger WHERE status IS NULL")
        raise RuntimeError(f"{n} rows have no status yet (first: {[r[0] for r in missing]}); the download is "
                           "incomplete - rerun to resume")
    return engine.scalar(con, "SELECT count(*) FROM ledger")


def ledger_sql(columns: str = LEDGER_COLUMNS) -> str:
    return f"SELECT {columns} FROM ledger_out ORDER BY ord"


def final_ledger(table_path: str, work: str, malformed_path: str | None = None) -> pa.Table:
    """The ledger as an Arrow table (LEDGER_SCHEMA), in input order: for tests and small datasets; the stage
    itself keeps it in the engine (build_ledger) and streams it to parquet."""
    with engine.connect() as con:
        build_ledger(con, table_path, work, malformed_path)
        return con.sql(ledger_sql()).to_arrow_table().cast(LEDGER_SCHEMA)


SOURCE_ORDER = "gpath, src_shard, i2d_key"  # the order successes are read from img2dataset's shards


def success_shards(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(group path, shard id) of every img2dataset shard that holds a success of the ledger, in order."""
    return con.execute("SELECT DISTINCT gpath, src_shard FROM ledger_v WHERE status = 'success' ORDER BY 1, 2").fetchall()


def success_by_shard(con: duckdb.DuckDBPyConnection, columns: str = "i2d_key, key", where: str = "",
                     rows: int = engine.BATCH_ROWS) -> Iterator[tuple[str, int, pa.Table]]:
    """(group path, shard id, its successes' `columns`) per img2dataset shard, in SOURCE_ORDER, streamed from
    the engine: one shard's rows in memory at a time. `where`: an extra SQL condition on ledger_v. The
    connection must not run other queries until the iteration ends."""
    sql = (f"SELECT gpath, src_shard, {columns} FROM ledger_v WHERE status = 'success'"
           f"{' AND ' + where if where else ''} ORDER BY {SOURCE_ORDER}")
    cur, parts = None, []
    for batch in engine.batches(con, sql, rows=rows):
        g, s, n = batch.column(0), batch.column(1), len(batch)
        change = np.ones(n, bool)
        if n > 1:
            change[1:] = pc.or_(pc.not_equal(g.slice(1), g.slice(0, n - 1)),
                                pc.not_equal(s.slice(1), s.slice(0, n - 1))).to_numpy(zero_copy_only=False)
        starts = np.r_[np.flatnonzero(change), n]
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            here = (g[a].as_py(), s[a].as_py())
            if here != cur:
                if cur is not None:
                    yield cur[0], cur[1], pa.Table.from_batches(parts).drop_columns(["gpath", "src_shard"])
                cur, parts = here, []
            parts.append(batch.slice(a, b - a))
    if cur is not None:
        yield cur[0], cur[1], pa.Table.from_batches(parts).drop_columns(["gpath", "src_shard"])


def status_summary(con: duckdb.DuckDBPyConnection, table: str = "ledger") -> dict:
    """Counts by status, success rate and the 50 most common (status, reason) pairs, by group-bys."""
    by = dict(con.execute(f"SELECT status, count(*) FROM {table} GROUP BY status").fetchall())
    n = sum(by.values())
    reasons = con.execute(f"""SELECT status, reason, count(*) AS c FROM (
            SELECT status, CASE WHEN starts_with(reason, 'duplicate_of:') THEN 'duplicate_of:*' ELSE reason END AS reason
            FROM {table} WHERE status <> 'success')
        GROUP BY status, reason ORDER BY c DESC, status, reason LIMIT 50""").fetchall()
    return {"rows": n, "by_status": {k: by.get(k, 0) for k in STATUSES},
            "success_rate": round(by.get("success", 0) / max(1, n), 4),
            "reasons": [{"status": s, "reason": r, "count": c} for s, r, c in reasons]}


def ledger_fingerprint(con: duckdb.DuckDBPyConnection, table: str = "ledger_v") -> str:
    """sha256 over every row's (key, status, reason, source) in ledger order: identifies what a publication
    would contain. Streamed from the engine."""
    h = hashlib.sha256()
    engine.hash_text_column(con, f"""SELECT coalesce(key, 'None') || chr(31) || status || chr(31) || coalesce(reason, '')
        || chr(31) || coalesce(source, '') || chr(10) FROM {table} ORDER BY ord""", h)
    return h.hexdigest()
