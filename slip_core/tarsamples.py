"""Reading webdataset tar shards as untrusted input: which members may become samples, and when a shard is broken.

Shards come from downloads, other teams' exports or a store someone else can write to. A member is never used
as a sample key (let alone a path) when `unsafe_member_reason` names a reason: its name is absolute, has a
'..' / '.' / empty component, a NUL or other control character or a backslash, or it is a symlink, hard link,
device or fifo. `iter_samples` hands such a member over as an `{"__unsafe__": reason}` marker where it occurs
and the reader decides: the training loader skips and counts it (slip_core.data), the eval reader refuses the
shard (datasets/catalog.py), the whole-shard check reports it (datasets/shardcheck.py). Nothing here writes
to disk; the repository extracts no archive anywhere (tests/test_security.py scans for it).

A shard must end in tar's end-of-archive block. tarfile stops *silently* at a damaged header anywhere past
the first member (a cut mid-header, garbage, a bad checksum) and accepts a file cut between two members, so
a truncated shard would read as a short, healthy one; `iter_samples` checks the block where tarfile stopped
and raises BadShard after yielding the samples completed before the damage (the one in progress is dropped).

Grouping is webdataset's (its tariterators.base_plus_ext rule, lower-cased extension, consecutive members with
one key form a sample, `__*__` metadata members ignored), so a clean shard gives exactly webdataset's samples.
The rule is restated here (`base_plus_ext`, tested equal to webdataset's on hostile names) instead of imported:
importing anything from webdataset imports torch (~570 MB and ~5 s per process), which the dataset stage's
processes (ledger, publish, quality pass) never otherwise need.
"""
from __future__ import annotations

import re
import tarfile
from typing import IO, Iterator

BLOCK = tarfile.BLOCKSIZE
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
# webdataset's key/extension split: the key runs to the first '.' of the last name component (the regex also
# decides the odd cases, e.g. 'a/.b' -> ('a/', 'b')); no such '.' -> not a sample member
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# header type byte -> what it is (tarfile's constants are the raw bytes; datasets/tarshards.py reads them too)
LINKS_AND_DEVICES = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                      tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


class BadShard(ValueError):
    """A shard that cannot be read to its end: not a tar, truncated, a corrupt header, a duplicate member."""


class UnsafeMember(ValueError):
    """A member a reader refuses to use (see unsafe_member_reason)."""


def unsafe_name_reason(name: str) -> str | None:
    """Why a member name must not become a key or a path, or None if it is a plain relative name."""
    if not name:
        return "empty name"
    if _CONTROL.search(name):
        return "control character in name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    parts = (name[2:] if name.startswith("./") else name).split("/")
    if ".." in parts:
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    return None


def unsafe_member_reason(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be used ("symlink", "absolute path", ...), or None."""
    if info.type in LINKS_AND_DEVICES:
        return LINKS_AND_DEVICES[info.type]
    if not (info.isreg() or info.isdir()):
        return f"non-regular member (type {info.type!r})"
    return unsafe_name_reason(info.name.rstrip("/") if info.isdir() else info.name)


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """(key, extensions) of a member name as webdataset groups it; (None, None) when it has no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def describe(info: tarfile.TarInfo, reason: str) -> str:
    """'<reason>: <name>' with the name escaped (it may hold control characters)."""
    return f"{reason}: {info.name!r}"


def _check_end(f: IO[bytes], offset: int, where: str) -> None:
    """The block where tarfile stopped must be an end-of-archive (all-zero) block."""
    f.seek(offset)
    block = f.read(BLOCK)
    if not block:
        raise BadShard(f"{where}: truncated tar: ends at byte {offset} without the end-of-archive block")
    if len(block) < BLOCK:
        raise BadShard(f"{where}: truncated tar: header at byte {offset} is cut short ({len(block)} of {BLOCK} bytes)")
    if block.count(0) != BLOCK:
        raise BadShard(f"{where}: corrupt tar: unreadable header at byte {offset}")


def iter_samples(f: IO[bytes], where: str = "", skip: int = 0) -> Iterator[dict]:
    """Samples {'__key__': key, ext: bytes, ...} of one uncompressed tar (a seekable binary file), in order.

    An unsafe member comes as {'__key__': None, '__unsafe__': '<reason>: <name>'} where it occurs (the sample
    being built goes on). Raises BadShard if the tar is truncated or corrupt, after yielding the samples
    completed before the damage; `where` (the shard's URL) prefixes error messages. The first `skip` items
    (samples and unsafe markers, in the order they would be yielded) are passed over without reading their
    data: only headers are read, so a reader can start mid-shard at the cost of a header scan."""
    start = f.tell()
    end = f.seek(0, 2)
    f.seek(start)
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise BadShard(f"{where}: not a readable tar: {e}") from e
    cur: dict | None = None
    emitted = 0  # items yielded or skipped so far
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as e:
            raise BadShard(f"{where}: corrupt tar after byte {tf.offset}: {e}") from e
        if info is None:
            break
        tf.members.clear()  # one member at a time; a shard holds ~10k
        reason = unsafe_member_reason(info)
        if reason:
            emitted += 1
            if emitted > skip:
                yield {"__key__": None, "__unsafe__": describe(info, reason)}
            continue
        name = info.name
        if not info.isreg() or _META.match(name) or (name.startswith("__") and name.endswith("__")):
            continue
        key, ext = base_plus_ext(name)
        if key is None:  # no extension: not part of any sample (webdataset ignores it too)
            continue
        if info.offset_data + info.size > end:  # also keeps a hostile size field from becoming one huge read
            raise BadShard(f"{where}: truncated tar: member {name!r} needs {info.size} bytes, the file ends first")
        ext = ext.lower()
        if cur is None or key != cur["__key__"]:
            if cur is not None:
                emitted += 1
                if emitted > skip:
                    yield _loaded(tf, cur, where)
            cur = {"__key__": key}
        if ext in cur:
            raise BadShard(f"{where}: duplicate member {name!r}")
        # while skipping, keep the header only (read at yield time if the sample turns out to be wanted)
        cur[ext] = info if emitted < skip else _read(tf, info, where)
    _check_end(f, tf.offset, where)  # first: damage may have cut the sample in progress, which is then dropped
    if cur is not None and emitted + 1 > skip:
        yield _loaded(tf, cur, where)


def _read(tf: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> bytes:
    try:
        return tf.extractfile(info).read()
    except (tarfile.TarError, OSError) as e:
        raise BadShard(f"{where}: truncated tar: member {info.name!r}: {e}") from e


def _loaded(tf: tarfile.TarFile, sample: dict, where: str) -> dict:
    """A sample whose members may still be headers (collected while skipping) with their data read."""
    return {k: _read(tf, v, where) if isinstance(v, tarfile.TarInfo) else v for k, v in sample.items()}
