"""Vectorised YFCC100M metadata parsing and SLIP cleaning, one block of whole lines at a time.

`parse_block` does in numpy and the table engine what `yfcc.reference_row` does line by line, with the
same result byte for byte (tests/test_yfcc.py runs both on hostile input):

* lines are split at b"\\n" only (Python's binary line iteration), fields at b"\\t"; a line whose field count
  is not the file's layout is malformed, so is a 25-column line whose line number is not ASCII digits and a
  subset member whose photo id is not;
* percent-decoding is done on the bytes (a '%' followed by two hex digits becomes that byte; nothing else
  changes, as in urllib.parse.unquote_to_bytes), then '+' becomes ' '. When the raw field and the decoded
  bytes are valid UTF-8 this equals `unquote(text).replace("+", " ")` on the decoded text (unquote decodes
  runs of ASCII between non-ASCII characters, and a complete character never merges with its neighbours);
  every other row — invalid UTF-8 anywhere, a field over MAX_TEXT_CHARS, a number too long for int64 — is
  handed to the reference code, so rare cases cost Python time and nothing else does;
* SLIP's regexes run in Arrow's compute kernels (RE2), on only the rows that contain '<' (tags) or
  'http' / 'www' (URLs), as clean_slip skips them: `<a.*?>|</a>|<b>|</b>|<i>|</i>` has the same
  leftmost-first matches in RE2 and Python (`.` excludes only "\\n" in both), and `\\S` is spelled as the
  complement of exactly the characters Python's str `\\s` matches (str.isspace), since RE2's `\\S` is
  ASCII-only.

Speed (bench/filter_yfcc.py): every byte is looked at once, by one compiled pass (numba, GIL released)
that lists the tabs and newlines; field boundaries of a line are then plain index arithmetic into that one
array, and digit fields are read by a second small kernel. Everything after the subset test touches member
rows only (numpy and Arrow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_DIGITS = 18  # int64-safe; longer numbers go to the reference code
_WS_CLASS = "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace())
TAGS_RE2 = r"<a.*?>|</a>|<b>|</b>|<i>|</i>"
URLS_RE2 = f"http[^{_WS_CLASS}]+|www[^{_WS_CLASS}]+"
_HEX = np.full(256, -1, np.int16)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


@dataclass
class Layout:
    columns: int  # 25 or 23
    first_good: int  # physical line of the first well-formed line (the one that fixed the layout)
    pos: tuple  # (line number or None, photo id, hash or None, title, description, url)


@dataclass
class Block:
    """What one block gives: the kept rows (in file order), the malformed lines, counters, slow rows."""
    rows: pa.Table  # kept rows parsed here, in file order, with their physical line in `_phys`
    n_lines: int
    in_subset: int  # rows of `rows` (the slow rows are counted by the reference code)
    malformed: list  # [(physical line, reason)]
    slow: list  # [(physical line, raw line)] for the reference code (yfcc.reference_row)

    def shifted(self, lines: int) -> "Block":
        """The same block with every physical line number `lines` further down the file."""
        if not lines:
            return self
        rows = None if self.rows is None else self.rows.set_column(0, "_phys", pc.add(self.rows["_phys"], lines))
        return Block(rows, self.n_lines, self.in_subset, [(p + lines, why) for p, why in self.malformed],
                     [(p + lines, raw) for p, raw in self.slow])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _digits_kernel(buf, a, b, ok, val, long):  # pragma: no cover  (compiled; tested through _digits)
    for r in range(a.shape[0]):
        n = b[r] - a[r]
        good = n > 0
        v = 0
        for k in range(n):
            d = np.int64(buf[a[r] + k]) - 48
            if d < 0 or d > 9:
                good = False
                break
            if k < MAX_DIGITS:
                v = v * 10 + d
        ok[r] = good
        val[r] = v if good else 0
        long[r] = good and n > MAX_DIGITS


def _digits(buf: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is all ASCII digits and non-empty, value, too long: more than MAX_DIGITS, value left to the reference
    code) of the byte ranges [a, b), in one compiled loop."""
    ok, long = np.empty(len(a), bool), np.empty(len(a), bool)
    val = np.empty(len(a), np.int64)
    _digits_kernel(buf, np.ascontiguousarray(a, np.int64), np.ascontiguousarray(b, np.int64), ok, val, long)
    return ok, val, long


def binary_array(offs: np.ndarray, data: np.ndarray) -> pa.Array:
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offs) - 1,
                                            [None, pa.py_buffer(offs), pa.py_buffer(np.ascontiguousarray(data))])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _unquote_kernel(offs, data, hexval, out_offs, out):  # pragma: no cover  (compiled; tested through unquote_plus)
    j = 0
    for r in range(offs.shape[0] - 1):
        out_offs[r] = j
        i, end = offs[r], offs[r + 1]
        while i < end:
            c = np.int64(data[i])
            if c == 37 and i + 2 < end:  # '%' and two hex digits inside the field
                hi, lo = hexval[data[i + 1]], hexval[data[i + 2]]
                if hi >= 0 and lo >= 0:
                    c = hi * 16 + lo
                    i += 2
            out[j] = 32 if c == 43 else c
            j += 1
            i += 1
    out_offs[offs.shape[0] - 1] = j
    return j


def unquote_plus(offs: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percent-decode every field (bytes: '%' + two hex digits inside the field become that byte, as
    urllib.parse.unquote_to_bytes does), then '+' -> ' ' (decoded ones too), in one compiled pass."""
    out_offs, out = np.empty(len(offs), np.int64), np.empty(len(data), np.uint8)
    n = _unquote_kernel(np.ascontiguousarray(offs, np.int64), data, _HEX, out_offs, out)
    return out_offs, out[:n]


def valid_utf8(arr: pa.Array) -> np.ndarray:
    """Per-row UTF-8 validity of a binary array (whole-array cast; bisected only where it fails)."""
    out = np.ones(len(arr), bool)

    def check(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        try:
            arr.slice(lo, hi - lo).cast(pa.large_string())
            return
        except pa.ArrowInvalid:
            if hi - lo == 1:
                out[lo] = False
                return
        mid = (lo + hi) // 2
        check(lo, mid)
        check(mid, hi)

    check(0, len(arr))
    return out


def rows_containing(arr: pa.Array, needle: bytes) -> np.ndarray:
    """Per row of a compact large string/binary array: does it contain the ASCII `needle`? A numpy scan for
    its first byte, then its other bytes, within the row (an ASCII byte never occurs inside a multi-byte
    UTF-8 character, so this is the substring test on the text)."""
    if not len(arr):
        return np.zeros(0, bool)
    offs, data = offsets_data(arr)
    at = np.flatnonzero(data[:max(len(data) - len(needle) + 1, 0)] == needle[0])
    for k, c in enumerate(needle[1:], 1):
        at = at[data[at + k] == c]
    row = np.searchsorted(offs, at, side="right") - 1
    out = np.zeros(len(arr), bool)
    out[row[at + len(needle) <= offs[row + 1]]] = True
    return out


def _replace_where(arr: pa.Array, hit: np.ndarray, pattern: str) -> pa.Array:
    """`arr` with every match of RE2 `pattern` deleted in the rows `hit` (the others cannot match it)."""
    if not hit.any():
        return arr
    mask = pa.array(hit)
    return pc.replace_with_mask(arr, mask, pc.replace_substring_regex(arr.filter(mask), pattern, ""))


def slip_regexes(text: pa.Array) -> pa.Array:
    """SLIP's tag then URL removal on already unquoted text (compact large_string), in Arrow (RE2), on the
    rows that contain '<', resp. 'http' or 'www'."""
    tagged = rows_containing(text, b"<")
    # rows the tag pass leaves alone keep their http/www status; a tagged row may gain one ("ht<b>tp")
    linked = tagged | rows_containing(text, b"http") | rows_containing(text, b"www")
    return _replace_where(_replace_where(text, tagged, TAGS_RE2), linked, URLS_RE2)


def line_keys(lines: np.ndarray) -> pa.Array:
    """f"{ln:09d}" of each line number."""
    if not len(lines):
        return pa.array([], pa.large_string())
    return pc.utf8_lpad(pa.array(lines, pa.int64()).cast(pa.large_string()), 9, "0")


def _ranges(block: pa.Buffer, a: np.ndarray, b: np.ndarray) -> pa.LargeBinaryArray:
    """The byte ranges [a_i, b_i) of `block` (in increasing, non-overlapping order: one field of consecutive
    lines) as a compact binary array, copied once by Arrow. The ranges and the gaps between them are the
    elements of one zero-copy array over the block; the ranges are its even elements."""
    if not len(a):
        return pa.array([], pa.large_binary())
    offs = np.empty(2 * len(a), np.int64)
    offs[0::2], offs[1::2] = a, b
    view = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offs) - 1, [None, pa.py_buffer(offs), block])
    return view.take(pa.array(np.arange(0, len(offs) - 1, 2)))


def offsets_data(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, bytes) of a compact large_binary array (as _ranges gives), no copy."""
    offs = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    return offs - offs[0], data[offs[0]:offs[-1]]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _separators(buf, seps, newlines):  # pragma: no cover  (compiled; tested through _lines)
    """Positions of the tabs and newlines of buf in seps, and which of them are newlines (their index in
    seps) in newlines; returns both counts. Other control bytes are field content."""
    k = j = 0
    for i in range(buf.shape[0]):
        c = buf[i]
        if c <= 10:
            if c == 10:
                seps[k] = i
                newlines[j] = k
                j += 1
                k += 1
            elif c == 9:
                seps[k] = i
                k += 1
    return k, j


def _lines(buf: np.ndarray, last: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(line starts, separator positions, index in them of each line's first separator, tabs in each line)
    of a block of whole lines. Separators are the tabs and newlines, found by one pass over the bytes; a
    line's separators are consecutive in the array and its newline ends them, so field j ends at
    seps[first + j]. The output arrays are sized for the worst case but only the used part is touched."""
    seps, nl = np.empty(len(buf) + 1, np.int64), np.empty(len(buf) + 1, np.int64)
    k, j = _separators(buf, seps, nl)
    seps, nl = seps[:k], nl[:j]
    if last and len(buf) and buf[-1] != 10:  # a final line without its newline ends at the end of the block
        seps, nl = np.r_[seps, len(buf)], np.r_[nl, len(seps)]
    first = np.r_[0, nl[:-1] + 1] if len(nl) else nl
    starts = np.r_[0, seps[nl[:-1]] + 1] if len(nl) else nl
    return starts, seps, first, nl - first


def first_numbers(block, last: bool) -> tuple[np.ndarray, list[bytes]]:
    """(values of the lines whose first tab-separated field is 1..MAX_DIGITS ASCII digits, the other lines
    raw) of a block of whole lines: how a subset list is read."""
    buf = np.frombuffer(block, np.uint8)
    starts, seps, first, ntab = _lines(buf, last)
    ends = seps[first + ntab]  # each line's newline (or the block's end)
    ok, val, long = _digits(buf, starts, seps[first])  # up to the first tab, or the whole line
    plain = ok & ~long
    return val[plain], [bytes(buf[starts[i]:ends[i] + 1]) for i in np.flatnonzero(~plain)]


def parse_block(block, phys0: int, layout: Layout, bitmap: np.ndarray | None, line_offset: int, last: bool) -> Block:
    """Parse the whole lines of `block` (bytes-like; its first line is physical line `phys0`; `last`: the
    file's end, where a final line may lack its newline)."""
    buf = np.frombuffer(block, np.uint8)
    whole = pa.py_buffer(block)
    starts, seps, first, ntab = _lines(buf, last)
    phys = phys0 + np.arange(len(starts))
    want = layout.columns - 1
    malformed = [(int(p), f"{int(k) + 1} tab-separated fields, want {'25 or 23' if p < layout.first_good else layout.columns}")
                 for p, k in zip(phys[ntab != want], ntab[ntab != want])]
    good = np.flatnonzero(ntab == want)
    pos_ln, pos_id, pos_hash, pos_t, pos_d, pos_u = layout.pos
    if not len(good):
        return Block(None, len(starts), 0, malformed, [])

    def field(idx: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        a = starts[idx] if j == 0 else seps[first[idx] + j - 1] + 1
        return a, seps[first[idx] + j]

    slow_lines = []
    if pos_ln is None:
        ln = phys[good] + line_offset
    else:
        ok, ln, long = _digits(buf, *field(good, pos_ln))
        for i in np.flatnonzero(~ok):
            malformed.append((int(phys[good[i]]), "line number is not a number"))
        slow_lines += [int(i) for i in good[ok & long]]
        good, ln = good[ok & ~long], ln[ok & ~long]
    if bitmap is not None:
        inside = ln < len(bitmap)
        member = np.zeros(len(good), bool)
        member[inside] = bitmap[ln[inside]] != 0
        good, ln = good[member], ln[member]
    pid_ok, pid, pid_long = _digits(buf, *field(good, pos_id))
    for i in np.flatnonzero(~pid_ok):
        malformed.append((int(phys[good[i]]), "photo id is not a number"))
    slow_lines += [int(i) for i in good[pid_ok & pid_long]]
    keep = pid_ok & ~pid_long
    good, ln, pid = good[keep], ln[keep], pid[keep]
    rows, fast = _clean_rows(whole, field, good, layout)
    idx = np.flatnonzero(fast)
    slow_lines += [int(i) for i in good[~fast]]
    lines = ln[idx]
    table = pa.table({"_phys": pa.array(phys[good[idx]], pa.int64()), "key": line_keys(lines),
                      "line_number": pa.array(lines, pa.int64()), "photo_id": pa.array(pid[idx], pa.int64()), **rows})
    slow = sorted((int(phys[i]), bytes(buf[starts[i]:seps[first[i] + ntab[i]] + 1])) for i in set(slow_lines))
    return Block(table, len(starts), len(table), malformed, slow)


def _clean_rows(whole: pa.Buffer, field, good: np.ndarray, layout: Layout) -> tuple[dict, np.ndarray]:
    """The text columns of lines `good`, cleaned, for the rows the vectorised path takes, and that mask:
    raw and decoded text valid UTF-8, an ASCII hash, cleaned fields within MAX_TEXT (the rest go to the
    reference code). Nearly every row qualifies: selections are only taken when some do not."""
    _, _, pos_hash, pos_t, pos_d, pos_u = layout.pos
    raw = {j: _ranges(whole, *field(good, j)) for j in (pos_t, pos_d, pos_u)}
    fast = valid_utf8(raw[pos_t]) & valid_utf8(raw[pos_d]) & valid_utf8(raw[pos_u])
    text = {j: binary_array(*unquote_plus(*offsets_data(raw[j]))) for j in (pos_t, pos_d)}
    fast &= valid_utf8(text[pos_t]) & valid_utf8(text[pos_d])
    photo_hash = _ranges(whole, *field(good, pos_hash)) if pos_hash is not None else None
    if photo_hash is not None:
        fast &= np.asarray(pc.string_is_ascii(photo_hash.cast(pa.large_string(), safe=False)))
    # rows in `fast` are valid UTF-8 (checked above): the casts need not validate again
    title, desc = (slip_regexes(_select(text[j], fast).cast(pa.large_string(), safe=False)) for j in (pos_t, pos_d))
    too_long = np.asarray(pc.or_(pc.greater(pc.utf8_length(title), MAX_TEXT), pc.greater(pc.utf8_length(desc), MAX_TEXT)))
    fast[np.flatnonzero(fast)[too_long]] = False
    title, desc = _select(title, ~too_long), _select(desc, ~too_long)
    n = int(fast.sum())
    return {"photo_hash": _select(photo_hash, fast).cast(pa.large_string()) if photo_hash is not None else pa.array([""] * n, pa.large_string()),
            "title": title, "description": desc, "caption": pc.if_else(pc.not_equal(title, ""), title, desc),
            "download_url": _select(raw[pos_u], fast).cast(pa.large_string(), safe=False)}, fast


def _select(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    return arr if mask.all() else arr.take(pa.array(np.flatnonzero(mask)))


MAX_TEXT = 8192  # = yfcc.MAX_TEXT_CHARS (yfcc.py asserts they agree)
