"""YFCC15M from a parquet mirror of OpenAI's YFCC100M subset (the original Webscope download is gone).

Accepted: one parquet file, a folder of them, or a glob; local, `s3://`, `hf://` (huggingface_hub's fsspec
filesystem, when it is installed) — any fsspec URL. Detected by its schema (`is_yfcc_parquet`), not its
name. Expected columns, YFCC100M's own names (case-insensitive; `_` optional, so `photo_id` = `photoid`):

    photoid       required  the Flickr photo id (integer, or a string of digits)
    title         required  URL-encoded as in YFCC100M ('+' for spaces); null = empty
    description   required  likewise
    downloadurl   required  the image URL (`download_url` too)
    linenumber    optional  the row's line in yfcc100m_dataset (`line_number`, `line`): keys as the TSV path
    hash          optional  the photo hash (`photo_hash`)
    anything else (uid, usertags, pageurl, license*, ...) is ignored; a table with both `key` and `caption`
    is our own caption table (already cleaned), never a mirror

Rows get exactly the TSV path's treatment (datasets/sources/yfcc.py): SLIP cleaning of title and
description, stored separately with `caption` = title or description, MAX_TEXT_CHARS cap, strict mode.
The ledger key is the 9-digit line number when the mirror has one (so a dataset built from the mirror and
one built from the TSV have the same keys), else the photo id. A row without a usable photo id or URL is
malformed, with its 0-based row position across the files as its line number. Files are read one row group
at a time (bounded memory); cleaning is vectorised with the same code as the TSV path.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slip_core import storage
from slip_core.failpoints import failpoint

from datasets.sources import BadInput
from datasets.sources import yfcc
from datasets.sources import yfcc_parse as yparse

COLUMNS = {  # our name -> accepted spellings, normalised (lower case, no '_')
    "photo_id": ("photoid",), "title": ("title",), "description": ("description",),
    "download_url": ("downloadurl",), "line_number": ("linenumber", "line"), "photo_hash": ("hash", "photohash"),
}
REQUIRED = ("photo_id", "title", "description", "download_url")


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def files(source: str) -> list[str]:
    """The parquet files of `source` (a file, a folder, or a glob), sorted; URLs keep their scheme."""
    fs, path = storage.url_to_fs(source)
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".parquet")]
    else:
        found = [path] if fs.exists(path) else []
    if storage.is_local(source):
        return sorted(found)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return sorted(p if "://" in p else f"{proto}://{p}" for p in found)


def column_map(schema: pa.Schema) -> dict[str, str] | None:
    """{our name: the file's column} when `schema` is a YFCC100M-named table, else None. Our own caption
    table (yfcc.SCHEMA: it has `key` and `caption`, its text already cleaned) is not a mirror."""
    if {"key", "caption"} <= set(schema.names):
        return None
    by_norm = {_norm(n): n for n in schema.names}
    out = {ours: next((by_norm[a] for a in alts if a in by_norm), None) for ours, alts in COLUMNS.items()}
    return out if all(out[r] for r in REQUIRED) else None


def is_yfcc_parquet(source: str) -> bool:
    try:
        fl = files(source)
        if not fl:
            return False
        fs, path = storage.url_to_fs(fl[0])
        with fs.open(path, "rb") as f:
            return column_map(pq.read_schema(f)) is not None
    except (OSError, ValueError, pa.ArrowInvalid):
        return False


def _text(col: pa.ChunkedArray) -> pa.Array:
    return pc.fill_null(col.combine_chunks().cast(pa.large_string()), "")


def _digits_column(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, value) of an integer or digit-string column (int64 range)."""
    arr = col.combine_chunks()
    if pa.types.is_integer(arr.type):
        valid = np.asarray(pc.fill_null(pc.greater_equal(arr, 0), False))
        return valid, np.asarray(pc.fill_null(arr, 0).cast(pa.int64()))
    s = pc.fill_null(arr.cast(pa.large_string()), "")
    valid = np.asarray(pc.and_(pc.match_substring_regex(s, r"^[0-9]{1,18}$"), pc.invert(pc.equal(s, ""))))
    vals = pc.if_else(pa.array(valid), s, "0").cast(pa.int64())
    return valid, np.asarray(vals)


def _clean_batch(batch: pa.RecordBatch, cols: dict, row0: int, strict: bool, report: yfcc.FilterReport, bad,
                 bitmap: np.ndarray | None) -> pa.Table:
    t = pa.Table.from_batches([batch])
    pid_ok, pid = _digits_column(t[cols["photo_id"]])
    url = _text(t[cols["download_url"]])
    ok = pid_ok & np.asarray(pc.not_equal(url, ""))
    if cols["line_number"]:
        ln_ok, ln = _digits_column(t[cols["line_number"]])
        ok &= ln_ok
    else:
        ln = None
    for i in np.flatnonzero(~ok):
        bad(row0 + int(i), "no usable photo id, line number or download URL")
    if bitmap is not None and ln is not None:  # OpenAI's subset list, by line number
        ok &= (ln < len(bitmap)) & (bitmap[np.minimum(ln, max(len(bitmap) - 1, 0))] != 0) if len(bitmap) else False
    idx = pa.array(np.flatnonzero(ok))
    title_raw, desc_raw = _text(t[cols["title"]]).take(idx), _text(t[cols["description"]]).take(idx)
    t_dec, d_dec = (yparse.binary_array(*yparse.unquote_plus(*yparse.offsets_data(a.cast(pa.large_binary()))))
                    for a in (title_raw, desc_raw))
    titles, descs = _cleaned(title_raw, desc_raw, t_dec, d_dec, strict, report)
    keep = pc.invert(pc.and_(pc.equal(titles, ""), pc.equal(descs, ""))) if strict else pa.array(np.ones(len(titles), bool))
    report.in_subset += len(titles)
    report.dropped_empty += len(titles) - (pc.sum(keep).as_py() or 0)
    rows = np.flatnonzero(ok)
    ids = ln[rows] if ln is not None else pid[rows]
    keys = yparse.line_keys(ids) if ln is not None else pa.array(ids.astype(str), pa.large_string())
    out = pa.table({"key": keys, "line_number": pa.array(ln[rows] if ln is not None else np.full(len(rows), -1), pa.int64()),
                    "photo_id": pa.array(pid[rows], pa.int64()),
                    "photo_hash": _text(t[cols["photo_hash"]]).take(idx) if cols["photo_hash"] else pa.array([""] * len(rows), pa.large_string()),
                    "title": titles, "description": descs, "caption": pc.if_else(pc.not_equal(titles, ""), titles, descs),
                    "download_url": url.take(idx)})
    if ln is None:
        out = out.set_column(1, "line_number", pa.nulls(len(out), pa.int64()))
    return out.filter(keep)


def _cleaned(title_raw: pa.Array, desc_raw: pa.Array, t_dec: pa.Array, d_dec: pa.Array, strict: bool,
             report: yfcc.FilterReport) -> tuple[pa.Array, pa.Array]:
    """Cleaned title and description of every kept row, as the TSV path cleans them: rows whose decoded text
    is valid UTF-8 and within MAX_TEXT_CHARS after SLIP's regexes (in Arrow) are vectorised, strict mode's
    extra steps applied per row as the TSV path applies them; the others (invalid UTF-8, long text) go through
    the reference cleaner, which also cuts and counts long text."""
    fast = yparse.valid_utf8(t_dec) & yparse.valid_utf8(d_dec)
    idx = pa.array(np.flatnonzero(fast))
    title, desc = (yparse.slip_regexes(a.take(idx).cast(pa.large_string())) for a in (t_dec, d_dec))
    long = np.asarray(pc.or_(pc.greater(pc.utf8_length(title), yfcc.MAX_TEXT_CHARS),
                             pc.greater(pc.utf8_length(desc), yfcc.MAX_TEXT_CHARS)))
    fast[np.flatnonzero(fast)[long]] = False
    title, desc = title.filter(pa.array(~long)), desc.filter(pa.array(~long))
    if strict:
        title, desc = (pa.array([yfcc.clean_strict_from_slip(x) for x in a.to_pylist()], pa.large_string()) for a in (title, desc))
    slow = np.flatnonzero(~fast)
    clean = yfcc.clean_strict if strict else yfcc.clean_slip
    slow_t, slow_d = ([clean(x) for x in a.take(pa.array(slow)).to_pylist()] for a in (title_raw, desc_raw))
    for i, (tt, dd) in enumerate(zip(slow_t, slow_d)):  # the rare rows: the reference's rule, row by row
        if len(tt) > yfcc.MAX_TEXT_CHARS or len(dd) > yfcc.MAX_TEXT_CHARS:
            report.truncated_text += 1
            slow_t[i], slow_d[i] = tt[:yfcc.MAX_TEXT_CHARS], dd[:yfcc.MAX_TEXT_CHARS]
    back = np.empty(len(fast), np.int64)  # fast rows first, then the slow ones -> back into row order
    back[np.r_[np.flatnonzero(fast), slow]] = np.arange(len(fast))
    return tuple(pa.concat_arrays([a, pa.array(b, pa.large_string())]).take(pa.array(back))
                 for a, b in ((title, slow_t), (desc, slow_d)))


def filter_yfcc_parquet(source: str, output: str, subset: str | None = None, mode: str = "slip",
                        malformed_output: str | None = None, batch_rows: int = 65536) -> yfcc.FilterReport:
    """The parquet mirror -> our caption table (yfcc.SCHEMA) at `output`, like yfcc.filter_yfcc; the report
    likewise (`layout` = "parquet-mirror"). `subset` (OpenAI's TSV) filters by line number when the mirror
    has one."""
    strict = mode == "strict"
    fl = files(source)
    if not fl:
        raise BadInput(f"{source}: no parquet files")
    report = yfcc.FilterReport(layout="parquet-mirror")
    bitmap = np.frombuffer(yfcc.read_subset(subset), np.uint8) if subset else None
    report.subset_rows = int(bitmap.sum()) if bitmap is not None else 0
    bad_rows = yfcc.MalformedWriter(malformed_output)
    bad = yfcc.malformed_recorder(report, bad_rows)

    row0 = 0
    try:
        with storage.atomic_open(output, "wb") as out:
            writer = pq.ParquetWriter(out, yfcc.SCHEMA, compression="zstd")
            try:
                for url in fl:
                    fs, path = storage.url_to_fs(url)
                    with fs.open(path, "rb") as f:
                        pf = pq.ParquetFile(f)
                        cols = column_map(pf.schema_arrow)
                        if cols is None:
                            raise BadInput(f"{url}: not a YFCC100M-named parquet (need {', '.join(REQUIRED)})")
                        for batch in pf.iter_batches(batch_size=batch_rows, columns=[c for c in cols.values() if c]):
                            table = _clean_batch(batch, cols, row0, strict, report, bad, bitmap)
                            row0 += batch.num_rows
                            writer.write_table(table.cast(yfcc.SCHEMA))
                            failpoint("filter.batch_written")
                if row0 == 0 or report.malformed == row0:
                    raise BadInput(f"{source}: no well-formed row")
            finally:
                writer.close()
            bad_rows.close()
    except BaseException as e:
        bad_rows.abort(e)
        raise
    return yfcc.finish_report(report, row0, bitmap is not None, output)
