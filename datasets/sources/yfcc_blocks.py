"""YFCC100M metadata as blocks of whole lines, parsed in parallel and handed back in file order.

A local uncompressed file is memory-mapped: a block is a zero-copy view of the page cache, cut after the
last newline before BLOCK_BYTES (the numpy parser and Arrow read it in place). Anything else (any fsspec
URL, .bz2 / .gz / ...) is streamed with readinto into blocks of whole lines. Blocks are parsed by
datasets.sources.yfcc_parse.parse_block, `workers` at a time in threads (the numba kernels, numpy and
Arrow release the GIL). 23-column rows are numbered by position, so a block's first physical line is
counted before it is handed out; 25-column rows carry their line number, so once the layout is fixed blocks
are parsed as if they started at line 0 and shifted after (parsed_blocks).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import mmap
import os

import numpy as np
from fsspec.utils import infer_compression

from datasets.sources import BadInput
from datasets.sources import yfcc_parse as yparse
from slip_core import storage

BLOCK_BYTES = 16 << 20  # metadata is parsed in blocks of whole lines of about this size
PARSE_THREADS = min(os.cpu_count() or 1, 4)
AHEAD = 4  # blocks in flight per parse thread (views of the map; their parsed rows are ~1/10 of a block)
READ_ERRORS = (EOFError, OSError, ValueError, RuntimeError)  # what a truncated / corrupt compressed stream raises


def _corrupt(metadata: str, e: BaseException) -> BadInput:
    return BadInput(f"{metadata}: truncated or corrupt compressed file ({type(e).__name__}: {e})")


def stream_blocks(metadata: str, f, size: int | None = None):
    """(block of whole lines, is the last block) from binary stream f. Read with readinto where the stream
    has it, so the bytes are copied once; the partial line at a block's end starts the next block."""
    size = size or BLOCK_BYTES
    carry = b""
    while True:
        data = bytearray(len(carry) + size)
        data[:len(carry)] = carry
        try:
            if hasattr(f, "readinto"):
                got = f.readinto(memoryview(data)[len(carry):]) or 0
            else:
                chunk = f.read(size)
                got = len(chunk)
                data[len(carry):len(carry) + got] = chunk
        except READ_ERRORS as e:
            raise _corrupt(metadata, e) from None
        n = len(carry) + got
        if not got:
            if carry:
                yield bytes(carry), True
            return
        cut = data.rfind(b"\n", 0, n) + 1
        if cut == 0:
            carry = bytes(data[:n])
            continue
        carry = bytes(data[cut:n])
        del data[cut:]
        yield data, False


def mapped_blocks(path: str, size: int | None = None):
    """Like stream_blocks, for a local uncompressed file: zero-copy views of a memory map."""
    size = size or BLOCK_BYTES
    with open(path, "rb") as f:
        n = os.fstat(f.fileno()).st_size
        if not n:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with contextlib.suppress(AttributeError, OSError):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    view = memoryview(mm)
    pos = 0
    try:
        while pos < n:
            cut = mm.rfind(b"\n", pos, min(pos + size, n)) + 1
            if cut == 0:  # a line longer than a block: up to its end
                cut = mm.find(b"\n", pos + size) + 1 or n
            last = cut == n and mm[n - 1] != 10
            yield view[pos:cut], last
            pos = cut
    finally:
        view.release()
        with contextlib.suppress(BufferError):  # a view still alive elsewhere: the map closes when it dies
            mm.close()


def blocks(metadata: str, f):
    """The blocks of `metadata` (already opened as the binary stream f): mapped when it is a local
    uncompressed file, streamed from f otherwise."""
    if storage.is_local(metadata) and infer_compression(str(metadata)) is None:
        path = storage.url_to_fs(metadata)[1]
        if os.path.isfile(path):
            return mapped_blocks(path)
    return stream_blocks(metadata, f)


def count_lines(block, last: bool) -> int:
    """Physical lines in a block of whole lines (a last line without its newline counts)."""
    buf = np.frombuffer(block, np.uint8)
    return int(np.count_nonzero(buf == 10)) + (1 if last and len(buf) and buf[-1] != 10 else 0)


def bounded_map(fn, items, workers: int = PARSE_THREADS):
    """fn over items in `workers` threads, results in order, at most AHEAD * workers items in flight (a
    streamed file is never read far ahead of its consumer)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) > AHEAD * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def parsed_blocks(metadata, f, layout, bitmap, line_offset, vectorized, workers: int = PARSE_THREADS):
    """(block, first physical line, last, parse_block result or None) in file order.

    23-column rows are numbered by position, so each block's first line is counted before it is parsed.
    25-column rows carry their line number: once past the line that fixed the layout, blocks are parsed
    as if they started at line 0 and shifted here, so the newline count comes from the parse itself."""
    known = 0
    if not vectorized:
        for block, last in blocks(metadata, f):
            yield block, known, last, None
            known += count_lines(block, last)
        return

    def parse(block, first, lay, last):
        return yparse.parse_block(block, first, lay, bitmap, line_offset, last)

    relative = dataclasses.replace(layout, first_good=-1)  # every line of a shifted block is past it
    counting, done = True, 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()

        def ready():
            nonlocal done
            block, first, last, fut = pending.popleft()
            parsed = fut.result()
            if first is None:
                parsed, first = parsed.shifted(done), done
            done = first + parsed.n_lines
            return block, first, last, parsed

        for block, last in blocks(metadata, f):
            if counting:
                pending.append((block, known, last, pool.submit(parse, block, known, layout, last)))
                # a block holds at least one line: past a first good line 0 no count is needed
                known += count_lines(block, last) if layout.pos[0] is None or layout.first_good > 0 else 1
                counting = layout.pos[0] is None or known <= layout.first_good
            else:
                pending.append((block, None, last, pool.submit(parse, block, 0, relative, last)))
            while len(pending) > AHEAD * workers:  # parsing goes on while the caller writes a row group
                yield ready()
        while pending:
            yield ready()
