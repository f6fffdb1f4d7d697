"""Which source reader a metadata file needs, decided from its name and first lines."""
from __future__ import annotations

from slip_core import storage

from datasets.sources import BadInput, yfcc, yfcc_parquet


def detect_source(source: str) -> str:
    """'yfcc' for YFCC100M metadata (25 or 23 tab-separated fields), 'yfcc-parquet' for a parquet mirror with
    YFCC100M's column names (file, folder or glob; datasets/sources/yfcc_parquet.py), 'table' for any
    url+caption table."""
    if yfcc_parquet.is_yfcc_parquet(source):
        return "yfcc-parquet"
    if not storage.exists(source):
        raise BadInput(f"{source}: no such metadata file")
    low = source.lower()
    if low.endswith((".parquet", ".csv", ".csv.gz")):
        return "table"
    with yfcc.open_binary(source) as f:
        for _ in range(5):
            try:
                line = f.readline()
            except yfcc.READ_ERRORS as e:
                raise BadInput(f"{source}: truncated or corrupt compressed file ({type(e).__name__}: {e})") from None
            if not line:
                break
            if line.count(b"\t") + 1 in yfcc.LAYOUT_COLUMNS:
                return "yfcc"
    return "table"
