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

Speed: the file is read in blocks of whole lines (yfcc_blocks: memory-mapped when local and uncompressed)
and parsed in parallel threads (yfcc_parse: numpy byte scans, Arrow copies and RE2 regexes); per row only
the field count and the line number are looked at, the text fields are cut out, decoded and cleaned for
subset members only (~15% of YFCC100M). Rows are written in row groups with one ParquetWriter, so memory
stays flat whatever the input size. bench/filter_yfcc.py measures it against the reference loop.
"""
from __future__ import annotations

import html
import os
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slip_core import storage
from slip_core.failpoints import failpoint

from datasets.sources import BadInput
from datasets.sources import yfcc_parse as yparse
from datasets.sources import yfcc_blocks
from datasets.sources.yfcc_blocks import READ_ERRORS, parsed_blocks

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
assert yparse.MAX_TEXT == MAX_TEXT_CHARS


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
    return clean_strict_from_slip(clean_slip(text))


def clean_strict_from_slip(text: str) -> str:
    """The steps strict mode adds to SLIP-cleaned text."""
    return _SPACE.sub(" ", html.unescape(text)).strip()


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


def open_binary(url: str, threads: int | None = None):
    """Plain or compressed (by extension: .bz2, .gz, .xz, .zst) file at any fsspec URL. bzip2 (how YFCC100M's
    metadata ships) is decompressed in parallel, `threads` blocks at a time (indexed_bzip2: finds the block
    boundaries of one stream itself, so single-stream files parallelise too; bench/filter_yfcc.py measures it
    against `bzip2 -dc`)."""
    if str(url).lower().endswith(".bz2"):
        import indexed_bzip2

        fs, path = storage.url_to_fs(url)
        return indexed_bzip2.open(fs.open(path, "rb", block_size=1 << 22), parallelization=threads or os.cpu_count() or 1)
    return fsspec.open(url, "rb", compression="infer").open()




def read_subset(url: str) -> bytearray:
    """OpenAI's subset TSV -> membership bitmap indexed by line number (100 MB for all of YFCC100M,
    far less than a Python set of 14.8M ints). A header line or blank lines are skipped: a line counts when
    its first field, stripped of ASCII whitespace, is all digits. Parsed in blocks (yfcc_parse.first_numbers);
    the rare line that is not plain digits takes the Python rule."""
    if not storage.exists(url):
        raise BadInput(f"{url}: no such subset file")
    numbers = []
    with open_binary(url) as f:
        for plain, rare in yfcc_blocks.bounded_map(lambda b: yparse.first_numbers(*b), yfcc_blocks.blocks(url, f)):
            numbers.append(plain)
            for raw in rare:
                head = raw.split(b"\t", 1)[0].strip()
                if head.isdigit():
                    numbers.append(np.array([int(head)], np.int64))
    numbers = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
    bitmap = np.zeros(int(numbers.max()) + 1 if len(numbers) else 0, np.uint8)
    bitmap[numbers] = 1
    return bytearray(bitmap)


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


def reference_row(raw: bytes, phys: int, layout: yparse.Layout, bitmap, line_offset: int, strict: bool, report: FilterReport,
                  bad) -> tuple | None:
    """One metadata line the way SLIP's make_dataset.py reads it (the definition the vectorised parser must
    equal): the output row, or None (malformed -> `bad(phys, reason)`, not in the subset, or dropped)."""
    pos_ln, pos_id, pos_hash, pos_t, pos_d, pos_u = layout.pos
    ntab = raw.count(b"\t")
    if ntab != layout.columns - 1:
        bad(phys, f"{ntab + 1} tab-separated fields, want {'25 or 23' if phys < layout.first_good else layout.columns}")
        return None
    if pos_ln is None:
        ln = phys + line_offset
    else:
        head = raw[: raw.find(b"\t")]
        if not head.isdigit():
            bad(phys, "line number is not a number")
            return None
        ln = int(head)
        if ln >= 1 << 63:  # the table's int64 column cannot hold it
            bad(phys, "line number out of range")
            return None
    if bitmap is not None and (ln >= len(bitmap) or not bitmap[ln]):
        return None
    parts = raw.rstrip(b"\r\n").split(b"\t")
    pid = parts[pos_id]
    if not pid.isdigit():
        bad(phys, "photo id is not a number")
        return None
    if int(pid) >= 1 << 63:
        bad(phys, "photo id out of range")
        return None
    report.in_subset += 1
    try:  # only the three text fields are decoded
        title, desc, url = parts[pos_t].decode(), parts[pos_d].decode(), parts[pos_u].decode()
    except UnicodeDecodeError:  # counted once per row, kept with U+FFFD
        report.decode_errors += 1
        title, desc, url = (parts[i].decode("utf-8", "replace") for i in (pos_t, pos_d, pos_u))
    clean = clean_strict if strict else clean_slip
    title, desc = clean(title), clean(desc)
    if len(title) > MAX_TEXT_CHARS or len(desc) > MAX_TEXT_CHARS:
        report.truncated_text += 1
        title, desc = title[:MAX_TEXT_CHARS], desc[:MAX_TEXT_CHARS]
    if strict and not title and not desc:
        report.dropped_empty += 1
        return None
    return (phys, f"{ln:09d}", ln, int(pid), parts[pos_hash].decode("ascii", "replace") if pos_hash is not None else "",
            title, desc, title or desc, url)


def find_layout(metadata: str) -> yparse.Layout:
    """The layout fixed by the file's first line with 25 or 23 fields; BadInput when there is none."""
    with open_binary(metadata) as f:
        for phys, raw in enumerate(_checked_lines(metadata, f)):
            cols = raw.count(b"\t") + 1
            if cols in LAYOUT_COLUMNS:
                return yparse.Layout(cols, phys, _POS[cols])
    raise BadInput(f"{metadata}: no well-formed row (want 25 or 23 tab-separated fields per line)")


def _checked_lines(metadata: str, f):
    try:
        yield from f
    except READ_ERRORS as e:  # truncated / corrupt .bz2, .gz, .xz
        raise BadInput(f"{metadata}: truncated or corrupt compressed file ({type(e).__name__}: {e})") from None


_ROW_FIELDS = ("_phys", "key", "line_number", "photo_id", "photo_hash", "title", "description", "caption", "download_url")


def _strict_rows(table: pa.Table, report: FilterReport) -> pa.Table:
    """Strict mode on slip-cleaned rows (clean_strict = these steps after clean_slip); drops empty rows."""
    title = [clean_strict_from_slip(t) for t in table["title"].to_pylist()]
    desc = [clean_strict_from_slip(t) for t in table["description"].to_pylist()]
    keep = [bool(t or d) for t, d in zip(title, desc)]
    report.dropped_empty += keep.count(False)
    table = table.set_column(table.column_names.index("title"), "title", pa.array(title, pa.large_string()))
    table = table.set_column(table.column_names.index("description"), "description", pa.array(desc, pa.large_string()))
    table = table.set_column(table.column_names.index("caption"), "caption",
                             pa.array([t or d for t, d in zip(title, desc)], pa.large_string()))
    return table.filter(pa.array(keep, pa.bool_()))


def filter_yfcc(
    metadata: str,
    output: str,
    subset: str | None = None,
    mode: str = "slip",
    line_offset: int = 0,
    batch_rows: int = 65536,
    malformed_output: str | None = None,
    vectorized: bool = True,
) -> FilterReport:
    """Stream `metadata` (any fsspec URL, plain or compressed), keep subset rows, clean, write parquet `output`.

    `subset=None` keeps every well-formed row. `line_offset` is the line number of the first row of a
    23-column file that is one part of a split release. Returns a report (also written next to the
    output as `<output>.report.json`). The output appears atomically; so does `malformed_output` (if
    given): every malformed row's physical line number and what is wrong with it. `vectorized=False` runs
    the reference line loop on every row (the parity tests compare both). A missing, truncated or corrupt
    file, or one without a well-formed row, raises BadInput and writes nothing.
    """
    if mode not in CLEANERS:
        raise ValueError(f"unknown cleaning mode {mode!r}; choose from {sorted(CLEANERS)}")
    strict = mode == "strict"
    if not storage.exists(metadata):
        raise BadInput(f"{metadata}: no such metadata file")
    report = FilterReport()
    subset_bits = read_subset(subset) if subset else None
    report.subset_rows = subset_bits.count(1) if subset_bits is not None else 0
    bitmap = np.frombuffer(subset_bits, np.uint8) if subset_bits is not None else None
    layout = find_layout(metadata)
    report.layout = LAYOUT_COLUMNS[layout.columns]
    bad_rows = MalformedWriter(malformed_output)
    bad = malformed_recorder(report, bad_rows)
    phys0 = 0
    try:
        with storage.atomic_open(output, "wb") as out, open_binary(metadata) as f:
            # text columns are nearly all distinct: dictionary pages would only cost time and bytes
            # and min/max statistics only help on the key and number columns
            writer = pq.ParquetWriter(out, SCHEMA, compression="zstd", use_dictionary=False,
                                      write_statistics=["key", "line_number", "photo_id"])
            try:
                rows = RowGroups(writer, batch_rows)
                for block, first, last, parsed in parsed_blocks(metadata, f, layout, bitmap, line_offset, vectorized):
                    table, n = _filter_block(block, first, last, layout, bitmap, line_offset, strict, report, bad, parsed)
                    phys0 = first + n
                    rows.add(table.cast(SCHEMA))
                rows.flush()
            finally:
                writer.close()  # also on error (the temp file is dropped): no writer left to close a closed file
            bad_rows.close()
    except BaseException as e:
        bad_rows.abort(e)
        raise
    return finish_report(report, phys0, bitmap is not None, output)


class RowGroups:
    """Tables -> row groups of about `rows` rows (blocks give a few thousand kept rows each)."""

    def __init__(self, writer: pq.ParquetWriter, rows: int):
        self.writer, self.rows, self.pending, self.n = writer, rows, [], 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n += len(table)
        if self.n >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.n:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.rows)
            failpoint("filter.batch_written")  # crash tests: output open and incomplete
        self.pending, self.n = [], 0


def finish_report(report: FilterReport, rows_read: int, with_subset: bool, output: str) -> FilterReport:
    """The derived counters, and `<output>.report.json` (every YFCC source writes its report so)."""
    report.rows_read = rows_read
    report.written = report.in_subset - report.dropped_empty
    if with_subset:
        report.not_in_subset = report.rows_read - report.malformed - report.in_subset
    storage.atomic_write_text(output + ".report.json", json.dumps(report.to_dict(), indent=1))
    return report


def malformed_recorder(report: FilterReport, writer: MalformedWriter):
    """bad(line, reason): count a malformed row, stream it to `writer`, list its line in the report."""
    def bad(line: int, why: str) -> None:
        report.malformed += 1
        writer.add(line, why)
        if len(report.malformed_lines) < MAX_MALFORMED_KEPT:
            report.malformed_lines.append(line)
    return bad


def _filter_block(block, phys0, last, layout, bitmap, line_offset, strict, report, bad, parsed):
    """(output rows of one block in file order, lines in it). Malformed lines are reported in line order."""
    if parsed is not None:
        b = parsed
        n, fast, slow = b.n_lines, b.rows, b.slow
        report.in_subset += b.in_subset
    else:
        b = None
        lines = bytes(block).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        n, fast, slow = len(lines), None, [(phys0 + i, ln + b"\n") for i, ln in enumerate(lines)]
    if fast is not None and strict:
        fast = _strict_rows(fast, report)
    malformed = []
    rows = [r for p, raw in slow
            if (r := reference_row(raw, p, layout, bitmap, line_offset, strict, report,
                                   lambda q, why: malformed.append((q, why)))) is not None]
    if b is not None:
        malformed += b.malformed
    for q, why in sorted(malformed):
        bad(q, why)
    slow_t = pa.table({k: pa.array([r[i] for r in rows], t) for i, (k, t) in enumerate(
        zip(_ROW_FIELDS, [pa.int64()] + [pa.large_string() if f.type == pa.string() else f.type for f in SCHEMA]))})
    table = slow_t if fast is None else pa.concat_tables([fast.cast(slow_t.schema), slow_t])
    table = table.take(pc.sort_indices(table["_phys"])) if slow and fast is not None else table
    return table.drop_columns(["_phys"]), n


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
