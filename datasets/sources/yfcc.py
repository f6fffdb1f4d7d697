"""YFCC100M metadata -> cleaned YFCC15M caption table (parquet), streamed in constant memory.

Facts (SLIP_SPEC.md §1, ENVIRONMENT.md §4): the metadata is tab-separated, 25 columns in the consolidated
release (0 line number, 1 photo id, 2 hash, 8 title, 9 description, 16 download URL) and 23 columns in
the older split / SQLite releases (no line number, no hash: the line number is the 0-based line position).
OpenAI's `yfcc100m_subset_data.tsv` lists (line number, photo id, hash) of the 14.8M-image subset.

Cleaning, mode "slip" (reference-exact, SLIP make_dataset.py): per field, percent-decode (plain unquote),
then every '+' becomes a space; delete `<a.*?>`, `</a>`, `<b>`, `</b>`, `<i>`, `</i>`; delete `http\\S+`
and `www\\S+`. Nothing else: no trimming, empty titles/descriptions are kept.
Mode "strict" (our option, never the default): the slip steps, then HTML entities unescaped, control
characters and runs of whitespace collapsed to one space, ends trimmed, and rows whose title AND
description are both empty dropped (counted in the report as `dropped_empty`).

Long text, both modes: a cleaned title or description longer than MAX_TEXT_CHARS characters is cut to its
first MAX_TEXT_CHARS; the row is kept (its image is as good as any) and counted once in the report as
`truncated_text`. A 1 MB caption would otherwise travel into every shard and loader, while CLIP's tokenizer
reads only the first 77 tokens. Cleaning itself is linear in the text length (see `_strip_tags`), so a
hostile field costs milliseconds before it is cut.

Speed: the hot loop only counts tabs and parses the line number of each row; the full split, decoding
and cleaning run only for subset members (~15% of YFCC100M). Rows are batched into pyarrow record
batches and written with one ParquetWriter, so memory stays flat whatever the input size.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from slip_core import storage
from slip_core.failpoints import failpoint

LAYOUT_COLUMNS = {25: "consolidated", 23: "legacy"}
# field positions per layout: (line number or None, photo id, hash or None, title, description, url)
_POS = {25: (0, 1, 2, 8, 9, 16), 23: (None, 0, None, 6, 7, 14)}

SCHEMA = pa.schema([
    ("key", pa.string()),  # dataset key of the row: 9-digit zero-padded line number
    ("line_number", pa.int64()),
    ("photo_id", pa.int64()),
    ("photo_hash", pa.string()),
    ("title", pa.string()),
    ("description", pa.string()),
    ("caption", pa.string()),  # title, or the description when the title is empty (for plain-webdataset users)
    ("download_url", pa.string()),
])

_TAGS = re.compile(r"<a.*?>|</a>|<b>|</b>|<i>|</i>")
_URLS = re.compile(r"http\S+|www\S+")
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]+")
MAX_MALFORMED_KEPT = 1000  # line numbers reported; the count is always exact
MAX_TEXT_CHARS = 8192  # cleaned title / description cap (module docstring: "Long text")


def _strip_tags(text: str) -> str:
    """`_TAGS.sub("", text)`, in linear time. The regex retries `<a.*?>` from every '<a' to the end of the
    line when no '>' follows it: quadratic, ~45 min for a 1 MB field of '<a<a<a...'. Every match ends with '>'
    and none crosses a newline, so per line the regex only needs the part up to the last '>': each retry
    there succeeds and consumes what it scanned."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        end = line.rfind(">") + 1
        if end:
            lines[i] = _TAGS.sub("", line[:end]) + line[end:]
    return "\n".join(lines)


def clean_slip(text: str) -> str:
    """SLIP's caption cleaning, exactly (SPEC §1)."""
    text = unquote(text).replace("+", " ")
    if "<" in text:  # the regexes only ever match text containing these (fast path, same result)
        text = _strip_tags(text)
    if "http" in text or "www" in text:
        text = _URLS.sub("", text)
    return text


def clean_strict(text: str) -> str:
    """Our stricter option: SLIP cleaning, then entities, control chars and whitespace normalised."""
    return _SPACE.sub(" ", html.unescape(clean_slip(text))).strip()


CLEANERS = {"slip": clean_slip, "strict": clean_strict}


@dataclass
class FilterReport:
    rows_read: int = 0
    layout: str = ""
    in_subset: int = 0
    written: int = 0
    dropped_empty: int = 0
    not_in_subset: int = 0
    malformed: int = 0
    malformed_lines: list[int] = field(default_factory=list)  # physical 0-based line numbers (first 1000)
    decode_errors: int = 0  # kept rows whose bytes were not valid UTF-8 (decoded with U+FFFD)
    truncated_text: int = 0  # kept rows whose title or description was cut to MAX_TEXT_CHARS
    subset_rows: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def open_binary(url: str):
    """Plain or compressed (by extension: .bz2, .gz, .xz, .zst) file at any fsspec URL."""
    return fsspec.open(url, "rb", compression="infer").open()


def read_subset(url: str) -> bytearray:
    """OpenAI's subset TSV -> membership bitmap indexed by line number (100 MB for all of YFCC100M,
    far less than a Python set of 14.8M ints). A header line or blank lines are skipped."""
    bitmap = bytearray()
    with open_binary(url) as f:
        for raw in f:
            head = raw.split(b"\t", 1)[0].strip()
            if not head.isdigit():
                continue
            ln = int(head)
            if ln >= len(bitmap):
                bitmap.extend(b"\0" * max(ln + 1 - len(bitmap), len(bitmap) // 2, 1 << 16))
            bitmap[ln] = 1
    return bitmap


MALFORMED_SCHEMA = pa.schema([("line_number", pa.int64()), ("reason", pa.string())])  # one row per malformed line


class MalformedWriter:
    """Streams (physical line number, reason) of every malformed input row to a parquet file (all of them:
    the report keeps only the first MAX_MALFORMED_KEPT line numbers); atomic, like the main output."""

    def __init__(self, url: str | None):
        self.url, self.rows, self.cm, self.writer = url, [], None, None

    def add(self, line: int | None, reason: str) -> None:
        if self.url is not None:
            self.rows.append((line, reason))
            if len(self.rows) >= 65536:
                self.flush()

    def flush(self) -> None:
        if self.url is None or (not self.rows and self.writer is not None):
            return
        if self.writer is None:
            self.cm = storage.atomic_open(self.url, "wb")
            self.writer = pq.ParquetWriter(self.cm.__enter__(), MALFORMED_SCHEMA, compression="zstd")
        lines, reasons = zip(*self.rows) if self.rows else ((), ())
        self.writer.write_table(pa.table({"line_number": pa.array(lines, pa.int64()), "reason": pa.array(reasons, pa.string())}))
        self.rows = []

    def close(self) -> None:
        if self.url is not None:
            self.flush()
            self.writer.close()
            self.cm.__exit__(None, None, None)
            self.cm = None

    def abort(self, e: BaseException) -> None:
        if self.cm is not None:
            self.cm.__exit__(type(e), e, e.__traceback__)
            self.cm = None


def _write(writer: pq.ParquetWriter, rows: list[tuple]) -> None:
    if rows:
        cols = list(zip(*rows))
        writer.write_batch(pa.record_batch([pa.array(c, t) for c, t in zip(cols, SCHEMA.types)], schema=SCHEMA))
        failpoint("filter.batch_written")  # crash tests: output open and incomplete


def filter_yfcc(
    metadata: str,
    output: str,
    subset: str | None = None,
    mode: str = "slip",
    line_offset: int = 0,
    batch_rows: int = 65536,
    malformed_output: str | None = None,
) -> FilterReport:
    """Stream `metadata` (any fsspec URL, plain or .bz2), keep subset rows, clean, write parquet `output`.

    `subset=None` keeps every well-formed row. `line_offset` is the line number of the first row of a
    23-column file that is one part of a split release. Returns a report (also written next to the
    output as `<output>.report.json`). The output appears atomically; so does `malformed_output` (if
    given): every malformed row's physical line number and what is wrong with it.
    """
    if mode not in CLEANERS:
        raise ValueError(f"unknown cleaning mode {mode!r}; choose from {sorted(CLEANERS)}")
    clean, strict = CLEANERS[mode], mode == "strict"
    report = FilterReport()
    bitmap = read_subset(subset) if subset else None
    report.subset_rows = bitmap.count(1) if bitmap is not None else 0
    nbits = len(bitmap) if bitmap is not None else 0
    layout, want_tabs = None, -1
    malformed_lines = report.malformed_lines

    bad_rows = MalformedWriter(malformed_output)

    def bad(phys: int, why: str) -> None:
        report.malformed += 1
        bad_rows.add(phys, why)
        if len(malformed_lines) < MAX_MALFORMED_KEPT:
            malformed_lines.append(phys)

    # Hot loop: every row costs one tab count, one find and one int(); only subset members are split,
    # decoded and cleaned. Counters of the common cases are derived at the end instead of incremented.
    try:
        with storage.atomic_open(output, "wb") as out, open_binary(metadata) as f:
            writer = pq.ParquetWriter(out, SCHEMA, compression="zstd")
            rows: list[tuple] = []
            phys = -1
            for phys, raw in enumerate(f):
                ntab = raw.count(b"\t")
                if ntab != want_tabs:
                    if layout is None and ntab + 1 in LAYOUT_COLUMNS:  # the first well-formed row fixes the layout
                        layout, want_tabs = ntab + 1, ntab
                        report.layout = LAYOUT_COLUMNS[layout]
                        pos_ln, pos_id, pos_hash, pos_t, pos_d, pos_u = _POS[layout]
                    else:
                        bad(phys, f"{ntab + 1} tab-separated fields, want {want_tabs + 1 if layout else '25 or 23'}")
                        continue
                if pos_ln is None:
                    ln = phys + line_offset
                else:
                    head = raw[: raw.find(b"\t")]
                    if not head.isdigit():
                        bad(phys, "line number is not a number")
                        continue
                    ln = int(head)
                if bitmap is not None and (ln >= nbits or not bitmap[ln]):
                    continue
                parts = raw.rstrip(b"\r\n").split(b"\t")
                pid = parts[pos_id]
                if not pid.isdigit():
                    bad(phys, "photo id is not a number")
                    continue
                report.in_subset += 1
                try:  # only the three text fields are decoded
                    title, desc, url = parts[pos_t].decode(), parts[pos_d].decode(), parts[pos_u].decode()
                except UnicodeDecodeError:  # counted once per row, kept with U+FFFD
                    report.decode_errors += 1
                    title, desc, url = (parts[i].decode("utf-8", "replace") for i in (pos_t, pos_d, pos_u))
                title, desc = clean(title), clean(desc)
                if len(title) > MAX_TEXT_CHARS or len(desc) > MAX_TEXT_CHARS:
                    report.truncated_text += 1
                    title, desc = title[:MAX_TEXT_CHARS], desc[:MAX_TEXT_CHARS]
                if strict and not title and not desc:
                    report.dropped_empty += 1
                    continue
                rows.append((f"{ln:09d}", ln, int(pid), parts[pos_hash].decode("ascii", "replace") if pos_hash is not None else "",
                             title, desc, title or desc, url))
                if len(rows) >= batch_rows:
                    _write(writer, rows)
                    rows = []
            _write(writer, rows)
            writer.close()
            bad_rows.close()
    except BaseException as e:
        bad_rows.abort(e)
        raise
    report.rows_read = phys + 1
    report.written = report.in_subset - report.dropped_empty
    if bitmap is not None:
        report.not_in_subset = report.rows_read - report.malformed - report.in_subset
    storage.atomic_write_text(output + ".report.json", json.dumps(report.to_dict(), indent=1))
    return report


def format_row(line_number: int, photo_id: int, photo_hash: str, title: str, description: str,
               download_url: str, *, user: str = "12345678@N00", tags: str = "", columns: int = 25) -> str:
    """One metadata line in YFCC100M format (text fields URL-encoded with '+' for spaces, as Yahoo did).
    Used by the demo corpus, the tests and the benchmark generator."""
    from urllib.parse import quote_plus

    page = f"http://www.flickr.com/photos/{user}/{photo_id}/"
    cols = [str(line_number), str(photo_id), photo_hash, user, "someone", "2012-02-16 09:56:37.0", "1329386197",
            "Canon+EOS+400D", quote_plus(title), quote_plus(description), quote_plus(tags), "", "", "", "",
            page, download_url, "Attribution License", "http://creativecommons.org/licenses/by/2.0/",
            "1", "1", "abcdef1234", "fedcba4321", "jpg", "0"]
    if columns == 23:
        cols = cols[1:2] + cols[3:]
    elif columns != 25:
        raise ValueError("columns must be 25 or 23")
    return "\t".join(cols)
