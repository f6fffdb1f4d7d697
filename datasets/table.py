"""The caption table as the download stage reads it: columns, and which rows can be downloaded at all.

The table (datasets/sources/) has `key`, a URL column (`url`, or `download_url` on the YFCC path) and a
caption; `filter_rows` gives each row the reason it is never handed to img2dataset ('' = downloadable).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import storage

from datasets.sources.captions import url_column


def read_table(table_path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = storage.url_to_fs(table_path)
    with fs.open(p, "rb") as f:
        if columns is not None:  # the URL column is `url` or `download_url`
            names = pq.read_schema(f).names
            columns = [c if c != "url" else url_column(names) for c in columns]
        return pq.read_table(f, columns=columns)


def filter_rows(table: pa.Table) -> pa.Table:
    """key, url, reason for rows never handed to img2dataset (reason '' = downloadable)."""
    keys, urls = table["key"].to_pylist(), table[url_column(table.column_names)].to_pylist()
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
