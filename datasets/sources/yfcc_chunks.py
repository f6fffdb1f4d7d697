"""YFCC100M metadata filtering split into independent byte ranges, for a cluster (Dask via Prefect).

`yfcc.filter_yfcc` streams one file in one process, its blocks parsed by threads of that process (about
1.3-1.5M rows/s on 2 cores, bench/filter_yfcc.py: all of YFCC100M in a few minutes on one machine). Here,
for many machines, the file is cut into byte ranges at line starts, every range is filtered on its own by the
very same `filter_yfcc` (on a local copy of just that range), and the parts are concatenated in order.
The result is identical to one `filter_yfcc` over the whole file - same rows in the same order, same
report - because the cut points respect the two pieces of state `filter_yfcc` carries along a file:

* the layout (25 or 23 columns) is fixed by the first line whose field count is 25 or 23: every range
  starts at a line that has the whole file's layout, so each range fixes the same one;
* 23-column files number rows by physical position: each range gets `line_offset` = lines before it
  (counted by a separate pass, `count_lines`); physical line numbers in the report are shifted back.

Compressed metadata (.bz2, .gz, ...) has no byte ranges: it is filtered as one range (decompress it
first, e.g. `lbzip2 -d`, to parallelise). The flow is flows/filter_distributed.py.
"""
from __future__ import annotations

import json
import os
import tempfile

import fsspec
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from datasets.sources import yfcc
from slip_core import storage

BLOCK = 8 << 20  # copy / count in 8 MiB blocks: memory stays flat whatever the range size


def _fields(line: bytes) -> int:
    return line.rstrip(b"\r\n").count(b"\t") + 1


def file_layout(metadata: str, max_lines: int = 100_000) -> int | None:
    """Field count (25 or 23) of the first line that has one, as filter_yfcc decides it; None if none."""
    with yfcc.open_binary(metadata) as f:
        for i, line in enumerate(f):
            if _fields(line) in yfcc.LAYOUT_COLUMNS:
                return _fields(line)
            if i >= max_lines:
                break
    return None


def plan_ranges(metadata: str, n_chunks: int) -> list[tuple[int, int]]:
    """[(start, end), ...] byte ranges covering the file, each starting at a line with the file's layout.
    end = -1 means "to the end of the file". One range for compressed input or n_chunks <= 1."""
    fs, path = storage.url_to_fs(metadata)
    layout = file_layout(metadata) if n_chunks > 1 and infer_compression(path) is None else None
    if layout is None:
        return [(0, -1)]
    size = fs.size(path)
    cuts = [0]
    with fs.open(path, "rb") as f:
        for k in range(1, n_chunks):
            target = max(k * size // n_chunks, cuts[-1] + 1)
            if target >= size:
                break
            f.seek(target - 1)
            f.readline()  # to the start of the first line beginning at or after `target`
            pos = f.tell()
            while pos < size:  # a line of another field count would fix a different layout: keep it in front
                line = f.readline()
                if _fields(line) == layout:
                    break
                pos += len(line)
            if cuts[-1] < pos < size:
                cuts.append(pos)
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [-1])]


def _read_range(metadata: str, start: int, end: int):
    """Bytes of [start, end) in blocks (end = -1: to EOF; compressed files are read decompressed)."""
    if end == -1 and start == 0:
        with yfcc.open_binary(metadata) as f:
            while block := f.read(BLOCK):
                yield block
        return
    fs, path = storage.url_to_fs(metadata)
    with fs.open(path, "rb") as f:
        f.seek(start)
        left = (fs.size(path) if end == -1 else end) - start
        while left > 0 and (block := f.read(min(BLOCK, left))):
            left -= len(block)
            yield block


def count_lines(metadata: str, start: int, end: int) -> int:
    """Lines in the range, counted as filter_yfcc iterates them (a last line without a newline counts)."""
    n, last = 0, b"\n"
    for block in _read_range(metadata, start, end):
        n += block.count(b"\n")
        last = block[-1:]
    return n + (last != b"\n")


def filter_range(metadata: str, start: int, end: int, part: str, subset: str | None = None, mode: str = "slip",
                 line_offset: int = 0) -> dict:
    """filter_yfcc on the lines in [start, end) (copied to a local temp file) -> parquet `part`; the report."""
    with tempfile.TemporaryDirectory(prefix="yfcc-range-") as tmp:
        local = os.path.join(tmp, "metadata")
        with open(local, "wb") as f:
            for block in _read_range(metadata, start, end):
                f.write(block)
        report = yfcc.filter_yfcc(local, part, subset=subset, mode=mode, line_offset=line_offset).to_dict()
    fs, p = storage.url_to_fs(part + ".report.json")
    fs.rm(p)
    return report


def merge_reports(reports: list[dict]) -> yfcc.FilterReport:
    """One report for the whole file from the reports of its consecutive ranges."""
    out = yfcc.FilterReport()
    layouts = {r["layout"] for r in reports if r["layout"]}
    if len(layouts) > 1:
        raise RuntimeError(f"ranges disagree on the layout {sorted(layouts)}: plan_ranges is broken")
    out.layout = layouts.pop() if layouts else ""
    out.subset_rows = reports[0]["subset_rows"] if reports else 0
    first_line = 0
    for r in reports:
        for k in ("in_subset", "written", "dropped_empty", "not_in_subset", "malformed", "decode_errors"):
            setattr(out, k, getattr(out, k) + r[k])
        out.malformed_lines += [first_line + ln for ln in r["malformed_lines"]]
        first_line += r["rows_read"]
    out.rows_read = first_line
    out.malformed_lines = out.malformed_lines[: yfcc.MAX_MALFORMED_KEPT]
    return out


def concat_parts(parts: list[str], output: str) -> int:
    """Concatenate the part parquets, in order, into `output` (atomic); returns the number of rows."""
    n = 0
    with storage.atomic_open(output, "wb") as out:
        writer = pq.ParquetWriter(out, yfcc.SCHEMA, compression="zstd")
        for part in parts:
            with fsspec.open(part, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                    writer.write_batch(batch)
                    n += batch.num_rows
        writer.close()
    return n


def finish(parts: list[str], reports: list[dict], output: str, parts_dir: str | None = None) -> yfcc.FilterReport:
    """Concatenate the parts, write `<output>.report.json` like filter_yfcc, delete the parts (and parts_dir)."""
    report = merge_reports(reports)
    if concat_parts(parts, output) != report.written:
        raise RuntimeError("the parts hold a different number of rows than their reports say")
    storage.atomic_write_text(output + ".report.json", json.dumps(report.to_dict(), indent=1))
    for part in parts:
        fs, p = storage.url_to_fs(part)
        if fs.exists(p):
            fs.rm(p)
    if parts_dir:
        fs, p = storage.url_to_fs(parts_dir)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    return report


def filter_yfcc_ranges(metadata: str, output: str, subset: str | None = None, mode: str = "slip",
                       n_chunks: int = 4, line_offset: int = 0, parts_dir: str | None = None) -> yfcc.FilterReport:
    """The whole recipe in this process, range after range (what the flow runs as parallel tasks)."""
    ranges = plan_ranges(metadata, n_chunks)
    counts = [count_lines(metadata, a, b) for a, b in ranges] if needs_line_counts(metadata) else None
    offsets = line_offsets(metadata, ranges, counts, line_offset)
    parts_dir = parts_dir or output + ".parts"
    parts = [storage.join(parts_dir, f"part-{i:05d}.parquet") for i in range(len(ranges))]
    reports = [filter_range(metadata, a, b, p, subset, mode, off) for (a, b), p, off in zip(ranges, parts, offsets)]
    return finish(parts, reports, output, parts_dir)


def needs_line_counts(metadata: str) -> bool:
    """Only 23-column files number rows by position (25-column rows carry their line number)."""
    return file_layout(metadata) == 23


def line_offsets(metadata: str, ranges: list[tuple[int, int]], counts: list[int] | None, line_offset: int = 0) -> list[int]:
    """line_offset for each range: lines before it (+ the caller's offset of the whole file)."""
    if counts is None:
        return [line_offset] * len(ranges)
    out, acc = [], line_offset
    for c in counts:
        out.append(acc)
        acc += c
    return out
