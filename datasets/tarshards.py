"""Minimal, fast tar reading/writing for repacking webdataset shards.

Python's tarfile parses and builds headers in pure Python with many small calls (~0.3 ms per member
here); repacking YFCC15M (45M members) with it would take hours. This reads the 512-byte headers with
one struct-free slice each (ustar + the pax `x` records img2dataset's writer emits + GNU long names),
and writes plain ustar headers with fixed owner/mtime so identical content gives identical bytes.
Only regular files are yielded; anything else is skipped. The output is readable by tarfile/webdataset.
"""
from __future__ import annotations

from typing import IO, Iterator

BLOCK = 512


def _num(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for big values
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _read_exact(f: IO[bytes], n: int) -> bytes:
    buf = f.read(n)
    while len(buf) < n:
        more = f.read(n - len(buf))
        if not more:
            raise EOFError("truncated tar")
        buf += more
    return buf


def _pax_path(data: bytes) -> str | None:
    pos, path = 0, None
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream, in order."""
    long_name = None
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK or header == b"\0" * BLOCK:
            return
        size = _num(header[124:136])
        kind = header[156:157]
        data = _read_exact(f, size)
        pad = (-size) % BLOCK
        if pad:
            _read_exact(f, pad)
        if kind in (b"x", b"L"):
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8")
            continue
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name = long_name
            else:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
                if prefix:
                    name = f"{prefix}/{name}"
            yield name, data
        long_name = None


def _header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class TarWriter:
    """Append regular files to a tar stream; `close()` writes the end-of-archive blocks."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def add(self, name: str, data: bytes) -> None:
        self.f.write(_header(name, len(data)))
        self.f.write(data)
        pad = (-len(data)) % BLOCK
        if pad:
            self.f.write(b"\0" * pad)

    def close(self) -> None:
        self.f.write(b"\0" * (2 * BLOCK))
