"""Which source reader a metadata file needs, decided from its name and first lines."""
from __future__ import annotations

from datasets.sources import yfcc


def detect_source(source: str) -> str:
    """'yfcc' for YFCC100M metadata (25 or 23 tab-separated fields), 'table' for any url+caption table."""
    low = source.lower()
    if low.endswith((".parquet", ".csv", ".csv.gz")):
        return "table"
    with yfcc.open_binary(source) as f:
        for _ in range(5):
            line = f.readline()
            if not line:
                break
            if line.count(b"\t") + 1 in yfcc.LAYOUT_COLUMNS:
                return "yfcc"
    return "table"
