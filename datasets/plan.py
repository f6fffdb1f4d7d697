"""Planning a download: which rows go to img2dataset next, in which groups of shards.

`plan` returns the unfinished groups of earlier attempts (resume) plus, in a new attempt, the rows no
complete shard or pending attempt holds (failed rows too with `retry_failed`). A group's input.parquet is
frozen once written, so img2dataset's shard ids always map to the same rows.

Shuffled shards: the rows of a new attempt are put in a seeded global permutation (order of
md5(seed, key): stable across DuckDB versions and machines, independent of the table's order) before they
are cut into groups and img2dataset shards. A YFCC table sorted by line number is sorted by upload and
user; without this, a shard — and so a loader's shuffle buffer — would hold one user's holiday photos.
All of it runs in the table engine (datasets/engine.py): the table is scanned, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from urllib.parse import quote, urlsplit, urlunsplit

import duckdb

from slip_core import storage

from datasets import engine
from datasets.config import DatasetConfig
from datasets.ledger import register_fates, register_input, table_columns
from datasets.sources.captions import url_column
from datasets.work import Group, group_complete, list_dirs, load_groups

# What a browser percent-encodes before sending a URL typed or pasted with spaces / non-ASCII characters
# (WHATWG URL: C0 controls, space, '"', '<', '>', '`', '{', '}' and every non-ASCII character, as UTF-8).
NEEDS_ENCODING = r'[^\x21-\x7e]|["<>`{}]'
_PATH_SAFE = "/%:@!$&'()*+,;=-._~[]|^\\"
_QUERY_SAFE = _PATH_SAFE + "?"


def browser_url(url: str) -> str:
    """`url` as a browser sends it: leading/trailing spaces and controls stripped, tabs/newlines removed,
    the host IDNA-encoded, path / query / fragment percent-encoded (existing %XX escapes kept). CC3M / CC12M
    have such rows; urllib refuses them ("URL can't contain control characters"). The ledger keeps the
    original."""
    url = re.sub(r"[\t\n\r]", "", url.strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"
                                              "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f "))
    parts = urlsplit(url)
    netloc = parts.netloc
    if any(ord(c) > 127 for c in netloc):
        userinfo, _, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = quote(host, safe="")
        netloc = (userinfo + "@" if userinfo else "") + host + colon + port
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=_PATH_SAFE), quote(parts.query, safe=_QUERY_SAFE),
                       quote(parts.fragment, safe=_QUERY_SAFE)))


RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}  # img2dataset main.py arguments_validator


def plan(table_path: str, work: str, cfg: DatasetConfig, retry_failed: bool = False) -> list[Group]:
    """Groups still to download: unfinished groups of earlier attempts (resume) plus, in a new attempt,
    rows no complete shard or pending attempt holds (failed rows too when `retry_failed`)."""
    pending: list[Group] = []
    fs, attempts_path = storage.url_to_fs(storage.join(work, "attempts"))
    for name in list_dirs(storage.join(work, "attempts")):
        groups = load_groups(storage.join(work, "attempts", name))
        if groups is None:  # killed while planning: nothing was downloaded from it
            fs.rm(f"{attempts_path}/{name}", recursive=True)
            continue
        pending += [g for g in groups if not group_complete(g)]
    with engine.connect() as con:
        register_input(con, table_path)
        register_fates(con, work)
        claimed = [engine.path(con, storage.join(g.path, "input.parquet")) for g in pending]
        con.execute("CREATE TEMP TABLE claimed (key VARCHAR)")
        if claimed:
            con.execute(f"INSERT INTO claimed SELECT DISTINCT CAST(sample_id AS VARCHAR) FROM read_parquet("
                        f"[{', '.join(map(engine.lit, claimed))}])")
        failed = "OR starts_with(f.status, 'failed')" if retry_failed else ""
        con.execute(f"""CREATE TEMP TABLE todo AS
            SELECT i.rn, row_number() OVER (ORDER BY md5(? || chr(31) || i.key), i.key) - 1 AS pos
            FROM inp i LEFT JOIN fates f ON f.key = i.key
            WHERE i.reason = '' AND i.key NOT IN (SELECT key FROM claimed) AND (f.status IS NULL {failed})""",
                    [str(cfg.shuffle_seed)])
        n = engine.scalar(con, "SELECT count(*) FROM todo")
        if n:
            seq = len(list_dirs(storage.join(work, "attempts")))
            pending += _new_attempt(con, table_path, n, work, cfg, seq)
    return pending


def i2d_select(columns: list[str]) -> str:
    """SELECT list turning caption-table columns into img2dataset input: url (browser-encoded where needed),
    caption, sample_id (our key; 'key' is reserved by img2dataset) + the other columns (saved into each
    sample's json)."""
    ucol = url_column(columns)
    out = [f"""CASE WHEN regexp_matches(CAST(t."{ucol}" AS VARCHAR), '{NEEDS_ENCODING}')
               THEN browser_url(CAST(t."{ucol}" AS VARCHAR)) ELSE CAST(t."{ucol}" AS VARCHAR) END AS url""",
           "CAST(t.caption AS VARCHAR) AS caption" if "caption" in columns else "'' AS caption",
           "CAST(t.key AS VARCHAR) AS sample_id"]
    out += [f't."{c}"' for c in columns if c not in RESERVED and c not in (ucol, "key", "sample_id")]
    return ", ".join(out)


def _new_attempt(con: duckdb.DuckDBPyConnection, table_path: str, n: int, work: str, cfg: DatasetConfig,
                 seq: int) -> list[Group]:
    """Write the groups of a new attempt (rows of `todo` in permutation order), then plan.json (its marker)."""
    cols = table_columns(con, table_path)
    src = engine.lit(engine.path(con, table_path))
    con.create_function("browser_url", browser_url, ["VARCHAR"], "VARCHAR")
    con.execute(f"""CREATE TEMP TABLE new_rows AS
        SELECT d.pos, {i2d_select(cols)} FROM read_parquet({src}, file_row_number=true) t
        JOIN todo d ON t.file_row_number = d.rn ORDER BY d.pos""")
    h = hashlib.sha256()
    engine.hash_text_column(con, "SELECT sample_id || chr(10) FROM new_rows ORDER BY pos", h)
    name = f"{seq:04d}-{h.hexdigest()[:12]}"
    attempt = storage.join(work, "attempts", name)
    nps = cfg.number_sample_per_shard
    per_group = nps * cfg.shards_per_group
    groups, meta = [], []
    for gi, start in enumerate(range(0, n, per_group)):
        rows = min(per_group, n - start)
        gpath = storage.join(attempt, f"g{gi:05d}")
        engine.copy_to_parquet(con, f"SELECT * EXCLUDE (pos) FROM new_rows WHERE pos >= {start} AND pos < {start + rows} "
                               "ORDER BY pos", storage.join(gpath, "input.parquet"))
        n_shards = math.ceil(rows / nps)
        groups.append(Group(name, gpath, rows, n_shards, nps))
        meta.append({"name": f"g{gi:05d}", "n_rows": rows, "n_shards": n_shards})
    storage.atomic_write_text(storage.join(attempt, "plan.json"),
                              json.dumps({"nps": nps, "rows": n, "groups": meta, "shuffle_seed": cfg.shuffle_seed}, indent=1))
    return groups
