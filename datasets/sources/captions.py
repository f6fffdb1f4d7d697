"""Any URL + caption table (CC3M / CC12M TSVs, CSV, TSV, parquet) -> our caption table (parquet).

The caption table is what the download stage consumes: columns `key` (string, unique, stable across
snapshots), `url`, `caption`, plus whatever else the source has (`title`, `description`, ...). The
YFCC path (datasets/sources/yfcc.py) writes `download_url` instead of `url`; `url_column()` resolves either.

CC3M's TSV is headerless `caption<TAB>url`, CC12M's is headerless `url<TAB>caption`: for a two-column
headerless file the URL column is recognised by its content. Files are streamed batch by batch
(pyarrow.csv.open_csv with newlines_in_values, so quoted multi-line captions work), memory stays flat.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from slip_core import storage

from datasets.sources import BadInput
from datasets.sources.yfcc import MAX_MALFORMED_KEPT, MAX_TEXT_CHARS, MalformedWriter  # one cap for every caption source

URL_NAMES = ("url", "download_url", "image_url", "img_url", "URL")
CAPTION_NAMES = ("caption", "text", "title", "alt", "TEXT", "captions")


def url_column(names: list[str]) -> str:
    for n in URL_NAMES:
        if n in names:
            return n
    raise ValueError(f"no URL column in {names}; expected one of {URL_NAMES}")


def _looks_like_url(s: str) -> bool:
    return "://" in s[:16]


def _sniff(url: str, delimiter: str) -> tuple[bool, list[str] | None]:
    """(has_header, column names for a headerless file) from the first line."""
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        raise BadInput(f"{url}: no such file")
    with fs.open(path, "rb", compression="infer") as f:
        try:
            first = f.readline().decode("utf-8", "replace").rstrip("\r\n").split(delimiter)
        except (EOFError, OSError) as e:
            raise BadInput(f"{url}: truncated or unreadable ({type(e).__name__}: {e})") from None
    if any(c in URL_NAMES for c in first):
        return True, None
    if len(first) == 2:  # CC3M (caption, url) or CC12M (url, caption)
        return False, ["url", "caption"] if _looks_like_url(first[0]) else ["caption", "url"]
    raise BadInput(f"{url}: cannot tell the URL column from the first line {repr(first[:4])[:120]}")


def row_keys(urls, captions) -> pa.Array:
    """Stable key per row: sha1(url TAB caption)[:20]; a new snapshot keeps the keys of unchanged rows."""
    def as_list(x):
        return x.to_pylist() if hasattr(x, "to_pylist") else list(x)

    out = [hashlib.sha1(f"{u}\t{c}".encode("utf-8", "replace")).hexdigest()[:20]
           for u, c in zip(as_list(urls), as_list(captions))]
    return pa.array(out, pa.string())


def _batches(url: str, report: dict):
    lower = url.lower()
    fs, path = storage.url_to_fs(url)
    if lower.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=65536)
        return
    delim = "\t" if any(lower.endswith(s) for s in (".tsv", ".tsv.gz", ".tsv.bz2", ".txt")) else ","
    has_header, names = _sniff(url, delim)
    read = pacsv.ReadOptions(column_names=names, block_size=1 << 24)
    def malformed(row) -> str:  # wrong column count: skipped, but counted (every input row has a fate)
        report["malformed"] += 1
        report["_bad"].append((row.text, f"{row.actual_columns} fields, want {row.expected_columns}"))
        return "skip"

    parse = pacsv.ParseOptions(delimiter=delim, newlines_in_values=True, invalid_row_handler=malformed)
    conv = pacsv.ConvertOptions(strings_can_be_null=False)
    with fs.open(path, "rb", compression="infer") as f:
        try:
            yield from pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv)
        except (EOFError, OSError, pa.ArrowInvalid) as e:  # truncated .gz / .bz2, unreadable bytes
            raise BadInput(f"{url}: truncated or unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def line_numbers(url: str, texts: list[str]) -> list[int | None]:
    """0-based physical line of each malformed row text, in order (pyarrow's CSV reader does not tell):
    one streamed pass over the file, run only when there are malformed rows."""
    want: dict[bytes, list[int]] = {}
    for i, t in enumerate(texts):
        want.setdefault(t.encode("utf-8", "surrogateescape"), []).append(i)
    out: list[int | None] = [None] * len(texts)
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb", compression="infer") as f:
        for n, raw in enumerate(f):
            hit = want.get(raw.rstrip(b"\r\n"))
            if hit:
                out[hit.pop(0)] = n
    return out


def _record_malformed(source: str, report: dict, malformed_output: str | None) -> None:
    bad = report.pop("_bad")
    lines = line_numbers(source, [t for t, _ in bad]) if bad else []
    report["malformed_lines"] = lines[:MAX_MALFORMED_KEPT]
    writer = MalformedWriter(malformed_output)
    for ln, (_, why) in zip(lines, bad):
        writer.add(ln, why)
    writer.close()


def normalize_table(source: str, output: str, caption_col: str | None = None, malformed_output: str | None = None) -> dict:
    """Write `output` (parquet): key, url, caption + the source's other columns as strings.
    Returned report: `rows` written, `malformed` rows skipped (wrong column count; first line numbers in
    `malformed_lines`), `truncated_text` captions cut to MAX_TEXT_CHARS. Every malformed row's line number
    and reason go to `malformed_output` (parquet) when given."""
    report = {"rows": 0, "source": source, "malformed": 0, "malformed_lines": [], "truncated_text": 0, "_bad": []}
    writer = None
    with storage.atomic_open(output, "wb") as out:
        for batch in _batches(source, report):
            t = pa.Table.from_batches([batch])
            names = t.column_names
            ucol = url_column(names)
            ccol = caption_col or next((c for c in CAPTION_NAMES if c in names), None)
            cols = {"url": pc.cast(t[ucol], pa.string())}
            cols["caption"] = pc.fill_null(pc.cast(t[ccol], pa.string()), "") if ccol else pa.array([""] * len(t))
            too_long = pc.greater(pc.utf8_length(cols["caption"]), MAX_TEXT_CHARS)
            report["truncated_text"] += pc.sum(too_long).as_py() or 0
            cols["caption"] = pc.utf8_slice_codeunits(cols["caption"], 0, MAX_TEXT_CHARS)
            keys = pc.cast(t["key"], pa.string()) if "key" in names else row_keys(cols["url"], cols["caption"])
            data = {"key": keys, **cols}
            for c in names:
                if c not in (ucol, ccol, "key") and c not in data:
                    data[c] = pc.cast(t[c], pa.string())
            table = pa.table(data)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table.cast(writer.schema))
            report["rows"] += len(table)
        if writer is None:
            raise BadInput(f"{source}: no well-formed row (want a URL and a caption column)")
        writer.close()
    _record_malformed(source, report, malformed_output)
    return report
