"""The one lock mechanism: an exclusive lease on a folder, on a local disk or an object store.

Three users: a stage root while one run builds and publishes it (artifacts.stage_lock), a dataset work
folder for a whole build (the dataset work lock), and a run folder while its one writer (trainer,
fine-tune) writes it (`writer_lease` + `ensure_writer`).

Local paths: flock on a lock file. The kernel drops the lock when its holder dies, SIGKILL included, so a
dead holder never blocks anyone. The file also names the holder (host, pid, process start time) for the
message a second writer prints. After locking we check that the path still names the file we locked: a
folder removed and recreated in between would otherwise let two processes hold "the" lock.

Object stores (s3://): a lease object written with a conditional PUT, `If-None-Match: *` to create it and
`If-Match: <etag>` to renew or take it over, so one writer wins even across hosts. Its metadata names the
holder and its time to live; a heartbeat thread renews it every ttl/3. A lease is dead when its holder is
on this host and its process is gone (taken over at once), or when nobody renewed it for its ttl (any
host), judged on the store's clock (LastModified against the response's Date), so hosts' clocks need not
agree. A successful conditional PUT is read back once after a short settle, so a store that evaluates the
condition non-atomically (moto's threaded server does) still cannot hand the lease to two writers. A holder
that could not renew for a whole ttl considers its lease lost: someone may have taken it over meanwhile.
Other object stores fall back to a flock in a per-user cache folder, which serialises one machine only.

A writer stops at once when its lease is lost: the lock file or object removed (its folder removed under
it) or taken over, or a `watch` URL appearing (the artifact it writes for was published by someone else).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Iterator

from slip_core import storage
from slip_core.procs import pid_alive, start_ticks

HOST = socket.gethostname()
LOCK_NAME = ".lock"  # a folder's own lock file / object (writer and work-folder leases)
DEFAULT_TTL_S = 30.0
LOCAL_POLL_S = 0.2
REMOTE_POLL_S = 1.0
SETTLE_S = 0.3
CLOCK_SLACK_S = 2.0  # S3 timestamps have one-second resolution
FALLBACK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "slip-pipeline", "locks")


class LockBusy(TimeoutError):
    """The lock is held by a live holder (named in the message and in `.holder`) past the allowed wait."""

    def __init__(self, msg: str, holder: "Holder | None" = None):
        super().__init__(msg)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This process no longer holds its lease (folder removed or published, lease taken over)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: int  # process start time in clock ticks (/proc): with the pid, one process for good
    token: str  # unique per acquisition
    since: str  # wall-clock time of acquisition (for people; never compared)
    purpose: str = ""
    ttl_s: float = 0.0

    @classmethod
    def me(cls, purpose: str, ttl_s: float = 0.0) -> "Holder":
        return cls(HOST, os.getpid(), start_ticks(os.getpid()), uuid.uuid4().hex,
                   _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), purpose, ttl_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Holder | None":
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError):
            return None

    def gone_here(self) -> bool:
        """True if the holder ran on this host and its process no longer exists."""
        return self.host == HOST and (not pid_alive(self.pid) or bool(self.start and start_ticks(self.pid) != self.start))


def describe(holder: Holder | None) -> str:
    if holder is None:
        return "another process (holder not recorded yet)"
    return f"{holder.purpose or 'a process'}: host {holder.host}, pid {holder.pid}, since {holder.since}"


# ------------------------------------------------------------------------------------------ backends

class _LocalFile:
    """flock on `path`; the file's content names the holder."""

    remote = False

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def try_acquire(self, holder: Holder) -> bool:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(10):  # the file replaced between open and flock: try the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            st = os.fstat(fd)
            if self._same_file(st):
                self._fd, self._ident = fd, (st.st_dev, st.st_ino)
                data = holder.to_json().encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                return True
            os.close(fd)  # closing drops the flock
        return False

    def _same_file(self, st: os.stat_result) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def current(self) -> Holder | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return Holder.from_json(f.read())
        except OSError:
            return None

    def lost_reason(self) -> str | None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return f"its lock file {self.path} was removed (the folder was removed under it)"
        if (now.st_dev, now.st_ino) != self._ident:
            return f"its lock file {self.path} was replaced (the folder was removed and recreated)"
        return None

    def renew(self) -> str | None:
        return None  # a flock does not expire

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self.lost_reason() is None:
                os.ftruncate(self._fd, 0)
        os.close(self._fd)  # drops the flock
        self._fd = None


def _precondition_failed(err: BaseException) -> bool:
    """s3fs turns a 412 into FileExistsError (If-None-Match) or OSError (If-Match); the cause says which."""
    cause = err.__cause__ or err
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412") or "pre-condition" in str(err)


class _S3Object:
    """A lease object on S3 (any S3 API with conditional writes: AWS, MinIO, moto)."""

    remote = True

    def __init__(self, url: str, ttl_s: float):
        self.url, self.ttl_s = url, ttl_s
        self.fs, path = storage.url_to_fs(url)
        self.bucket, self.key, _ = self.fs.split_path(path)
        self._etag: str | None = None
        self._holder: Holder | None = None
        self._renewed_at = 0.0

    def _put(self, holder: Holder, **cond) -> str:
        data = holder.to_json()
        r = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data.encode(),
                            Metadata={"holder": data}, ContentType="application/json", **cond)
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return r["ETag"]

    def _head(self) -> dict | None:
        try:
            return self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None

    def inspect(self) -> tuple[Holder | None, str | None, bool]:
        """(holder, etag, dead) of the lease object as it is now; (None, None, True) if there is none."""
        h = self._head()
        if h is None:
            return None, None, True
        holder = Holder.from_json(h.get("Metadata", {}).get("holder"))
        ttl = holder.ttl_s if holder and holder.ttl_s > 0 else self.ttl_s
        date = h.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        age = (parsedate_to_datetime(date) - h["LastModified"]).total_seconds() if date else 0.0
        return holder, h["ETag"], age > ttl + CLOCK_SLACK_S or (holder is not None and holder.gone_here())

    def current(self) -> Holder | None:
        return self.inspect()[0]

    def try_acquire(self, holder: Holder) -> bool:
        try:
            etag = self._put(holder, IfNoneMatch="*")
        except OSError as e:
            if not _precondition_failed(e):
                raise
            _, old, dead = self.inspect()
            if old is None or not dead:
                return False
            try:  # take over the dead holder's lease, unless someone else just did
                etag = self._put(holder, IfMatch=old)
            except OSError as e2:
                if not _precondition_failed(e2) and not isinstance(e2, FileNotFoundError):
                    raise
                return False
        time.sleep(SETTLE_S)  # then read back: a non-atomic store may have let a concurrent PUT win
        h = self._head()
        if h is None or h["ETag"] != etag:
            return False
        self._etag, self._holder, self._renewed_at = etag, holder, time.monotonic()
        return True

    def renew(self) -> str | None:
        """Extend the lease; a reason string if it is no longer ours, None if renewed (or a transient error)."""
        try:
            self._etag = self._put(self._holder, IfMatch=self._etag)
            self._renewed_at = time.monotonic()
            return None
        except FileNotFoundError:
            return f"its lease object {self.url} was removed"
        except OSError as e:
            if _precondition_failed(e):
                holder = self.current()
                return f"its lease object {self.url} was taken over by {describe(holder)}" if holder else \
                    f"its lease object {self.url} was removed"
            return None  # unreachable store: lost_reason() gives up after a whole ttl

    def lost_reason(self) -> str | None:
        if time.monotonic() - self._renewed_at > self.ttl_s:
            return f"its lease {self.url} could not be renewed for {self.ttl_s:.0f} s"
        return None

    def release(self) -> None:
        if self._etag is None:
            return
        with contextlib.suppress(FileNotFoundError):
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except OSError as e:
                if not _precondition_failed(e):  # a store without conditional deletes: check, then delete
                    h = self._head()
                    if h is not None and h["ETag"] == self._etag:
                        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        self._etag = None


def _backend(lock_url: str, ttl_s: float):
    if storage.is_local(lock_url):
        return _LocalFile(os.path.abspath(storage.url_to_fs(lock_url)[1]))
    fs, _ = storage.url_to_fs(lock_url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if {"s3", "s3a"} & set(protocols):
        return _S3Object(lock_url, ttl_s)
    digest = hashlib.sha256(str(lock_url).encode()).hexdigest()[:32]
    return _LocalFile(os.path.join(FALLBACK_DIR, digest + ".lock"))


# -------------------------------------------------------------------------------------------- lease

class Lease:
    """An exclusive lease on `lock_url` (use `acquire`, or `with lease(...)`)."""

    def __init__(self, lock_url: str, *, purpose: str = "", ttl_s: float = DEFAULT_TTL_S, watch: tuple = ()):
        self.lock_url, self.purpose, self.ttl_s = lock_url, purpose, ttl_s
        self.watch = tuple(w for w in watch if w)
        # Resolved once: check() runs before every training step, fsspec's URL parsing would cost more than it.
        self._watch_local = [os.path.abspath(storage.url_to_fs(w)[1]) for w in self.watch if storage.is_local(w)]
        self._watch_remote = [w for w in self.watch if not storage.is_local(w)]
        self._backend = _backend(lock_url, ttl_s)
        self._lost: str | None = None
        self.lost_event = threading.Event()  # set (by the heartbeat or check) once the lease is lost
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, wait_s: float | None = None, on_wait: Callable[[Holder | None], object] | None = None) -> "Lease":
        """Take the lease, waiting up to `wait_s` (None: as long as a live holder has it, 0: not at all)
        for a live holder; LockBusy naming the holder after that. `on_wait` is told once that we wait."""
        me = Holder.me(self.purpose, self.ttl_s if self._backend.remote else 0.0)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = False
        while not self._backend.try_acquire(me):
            holder = self._backend.current()
            if deadline is not None and time.monotonic() >= deadline:
                raise LockBusy(f"{self.lock_url} is held by {describe(holder)}", holder)
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(REMOTE_POLL_S if self._backend.remote else LOCAL_POLL_S)
        self.holder = me
        if self._backend.remote or self._watch_remote:
            self._beat = threading.Thread(target=self._heartbeat, name="slip-lease-heartbeat", daemon=True)
            self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            reason = self._backend.renew() or self._watched(self._watch_remote, storage.exists)
            if reason:
                self._lose(reason)
                return

    @staticmethod
    def _watched(urls: list[str], exists: Callable[[str], bool]) -> str | None:
        for url in urls:
            if exists(url):
                return f"{url} now exists (the artifact was published by another run)"
        return None

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        self.lost_event.set()

    def lost(self) -> bool:
        """True once this lease is no longer ours (the check below, without raising)."""
        try:
            self.check()
        except LeaseLost:
            return True
        return False

    def check(self) -> None:
        """Raise LeaseLost if this lease is no longer ours. Cheap (a stat or two): call before every write."""
        if self._lost is None:
            reason = self._backend.lost_reason() or self._watched(self._watch_local, os.path.exists)
            if reason:
                self._lose(reason)
        if self._lost is not None:
            raise LeaseLost(f"lost the lease {self.lock_url}: {self._lost}; stopping without writing more")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        self._backend.release()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lease(lock_url: str, *, wait_s: float | None = None, on_wait: Callable[[Holder | None], object] | None = None,
          purpose: str = "", ttl_s: float = DEFAULT_TTL_S, watch: tuple = ()) -> Iterator[Lease]:
    """Hold the lease on `lock_url` for the duration of the block (see Lease.acquire)."""
    held = Lease(lock_url, purpose=purpose, ttl_s=ttl_s, watch=watch).acquire(wait_s, on_wait)
    try:
        yield held
    finally:
        held.release()


# ------------------------------------------------------------------------------- one writer per folder
_WRITERS: dict[str, Lease] = {}


def _key(folder: str) -> str:
    folder = str(folder)
    if "://" not in folder or folder.startswith("file://"):  # not storage.is_local: this runs every step
        return os.path.abspath(folder.removeprefix("file://"))
    return folder.rstrip("/")


@contextlib.contextmanager
def writer_lease(folder: str, *, watch: tuple = (), wait_s: float | None = None, purpose: str = "writer",
                 on_wait: Callable[[Holder | None], object] | None = None,
                 ttl_s: float = DEFAULT_TTL_S) -> Iterator[Lease]:
    """Be the one process writing `folder` (lease `folder/.lock`): a second writer waits `wait_s`, then gets
    LockBusy naming us. `ensure_writer(path)` then raises LeaseLost once the folder was removed under us,
    taken over, or a `watch` URL (the published artifact) appeared."""
    try:
        held = Lease(storage.join(folder, LOCK_NAME), purpose=purpose, ttl_s=ttl_s, watch=watch).acquire(wait_s, on_wait)
    except LockBusy as e:
        raise LockBusy(f"{folder} is being written by {describe(e.holder)}; refusing to write it too", e.holder) from None
    key = _key(folder)
    _WRITERS[key] = held
    try:
        yield held
    finally:
        _WRITERS.pop(key, None)
        held.release()


@contextlib.contextmanager
def rank0_writer(folder: str, *, watch: tuple = (), wait_s: float | None = 120.0,
                 purpose: str = "writer") -> Iterator[Lease | None]:
    """`writer_lease` in the rank that writes a torchrun job's folder (RANK 0, or no RANK); other ranks hold
    nothing. Waiting is said once on stderr (a killed run's rank finishing its last checkpoint)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return

    def told(holder: Holder | None) -> None:
        print(f"{purpose}: {folder} is being written by {describe(holder)}; waiting up to {wait_s:.0f} s",
              file=sys.stderr, flush=True)

    with writer_lease(folder, watch=watch, wait_s=wait_s, purpose=purpose, on_wait=told) as held:
        yield held


def writer_for(path: str) -> Lease | None:
    """The writer lease this process holds on `path` or on a folder above it, if any."""
    key = _key(path)
    best = None
    for folder, held in _WRITERS.items():
        if (key == folder or key.startswith(folder.rstrip("/") + "/")) and (best is None or len(folder) > len(best[0])):
            best = (folder, held)
    return best[1] if best else None


def ensure_writer(path: str) -> None:
    """LeaseLost if this process holds the writer lease of `path` (or a folder above it) and lost it;
    nothing if it holds none (library use without a lease)."""
    held = writer_for(path)
    if held is not None:
        held.check()
