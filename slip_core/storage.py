"""Storage through fsspec: one place for opening any URL, atomic writes and content hashes.

Atomicity matters because every stage publishes files that later stages trust: a crash must never
leave a half-written file under its final name. Local files go through a temp file + fsync +
os.replace in the same directory; object stores publish a whole object on a single PUT.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from typing import IO, Iterator

import fsspec

CHUNK = 1 << 20
# This user's local cache, for what cannot live in the store (locks and training work folders of object-store
# roots, the demo corpus of a remote store): the one spelling of the path (slip_core.store.Store uses it).
CACHE_HOME = os.environ.get("SLIP_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "slip-pipeline")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(root: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping the scheme of `root`."""
    root = str(root)
    out = root.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str) -> str:
    """sha256 of a file's contents (any fsspec URL), streamed in 1 MiB chunks."""
    fs, path = url_to_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


HASH_MEMO_DIR = os.path.join(CACHE_HOME, "hashes")


def file_stamp(url: str) -> list:
    """What changes whenever a file's bytes may have: size and mtime in ns + inode locally; size, ETag and
    LastModified on object stores."""
    fs, path = url_to_fs(url)
    if is_local(url):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    info = fs.info(path)
    return [str(url), info.get("size"), info.get("ETag") or info.get("etag"),
            str(info.get("LastModified") or info.get("mtime") or "")]


def sha256_file_stamped(url: str, memo_dir: str | None = None) -> str:
    """sha256_file, remembered under the file's stamp (file_stamp) in `memo_dir` (any URL; default a per-user
    cache folder): an unchanged file is hashed once, not on every rerun that checks it. Any write to the
    file changes its stamp, so the memo is never consulted for different bytes."""
    stamp = json.dumps(file_stamp(url), sort_keys=True, default=str)
    memo = join(memo_dir or HASH_MEMO_DIR, hashlib.sha256(stamp.encode()).hexdigest()[:32])
    with contextlib.suppress(FileNotFoundError, OSError, UnicodeDecodeError):
        digest = read_text(memo).strip()
        if len(digest) == 64:
            return digest
    digest = sha256_file(url)
    with contextlib.suppress(OSError):  # a read-only cache only costs the re-hash next time
        atomic_write_text(memo, digest)
    return digest


def file_size(url: str) -> int:
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc; elsewhere the set-and-restore idiom)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open `url` for writing so that readers see either the old file or the complete new one."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'wb' and 'w', not {mode!r}")
    fs, path = url_to_fs(url)
    if is_local(url):
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() honours the umask
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        # Stage locally, then one PUT: an object store never exposes a partial object.
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, uuid.uuid4().hex)
            with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
            fs.put_file(tmp, path)


def remove_temp_files(root_url: str) -> list[str]:
    """Delete the temp files `atomic_open` leaves under a local folder when its process is SIGKILLed
    mid-write (`.<name>.<random>.tmp`: a kill skips the cleanup above). Only for a folder no other process
    is writing into (the caller holds its lock). Object stores never hold one (one PUT). Returns them."""
    if not is_local(root_url):
        return []
    removed = []
    for dirpath, _, names in os.walk(url_to_fs(root_url)[1]):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed.append(os.path.join(dirpath, name))
    return removed


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def put_file_atomic(local_path: str, url: str) -> None:
    """Copy a finished file (a local path or any URL) to `url` atomically, streamed in chunks."""
    fs, path = url_to_fs(local_path)
    with fs.open(path, "rb") as src, atomic_open(url, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
