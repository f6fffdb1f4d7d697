"""Artifact manifests: the only thing one stage hands the next.

An artifact is a folder (any fsspec root) holding its files plus `manifest.json`:
the sha256 and size of every file, the stage config, the manifests it was built from (upstream),
the stage identity it was built under (slip_core/identity.py: inputs, config, per-module code hashes,
library versions), the full code version and the time. The manifest is written last and atomically, so
its presence marks a complete artifact; `verify` re-hashes the files, so a partial or tampered artifact
is never used.
Lineage (eval number -> checkpoint -> dataset -> raw URL table) is walked through `upstream`.

Concurrency: two runs of the same stage with the same inputs share one content-addressed root
(`Store.stage_root`). A stage builds and publishes inside `stage_lock(root)`, re-checking under the lock whether
the root already verifies, so the second run waits for the first and reuses its output instead of
interleaving files with it. The lock is slip_core/locks.py's lease: a flock on a sibling file of a local
root, a lease object written with a conditional PUT next to an s3:// root (serialises runs on different
machines too).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from slip_core import locks, storage

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
CODE_PACKAGES = ("slip_core", "datasets", "evaluation", "flows")  # lineage only: `code_version`
LINEAGE_ONLY = ("created_at", "code_version")  # recorded, but not part of an artifact's content identity
RESUME_KIND = "resume-checkpoint"  # upstream role `resumed_from`: a checkpoint file, not an artifact


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable, or does not match its files."""


class StageBusy(locks.LockBusy):
    """Another run of the same stage held the stage root's lock for longer than we were told to wait."""


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact. `path` is relative to the artifact root, '/'-separated; a path
    `../<sibling>/<rest>` names a file of another artifact folder next to this one (an incremental dataset
    version referencing the unchanged shards of an earlier version): it is verified like the artifact's own
    files. Nothing else may leave the root (`resolve`)."""
    path: str
    sha256: str
    size: int


@dataclass
class Upstream:
    url: str  # manifest URL of the input artifact
    sha256: str  # manifest_sha256 of that manifest
    kind: str = ""


@dataclass
class Manifest:
    kind: str  # "caption-table" | "dataset" | "checkpoint" | "eval" | ...
    name: str
    files: list[FileEntry]
    config: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, Upstream] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # StageIdentity.to_dict() of the run that built it
    code_version: str = ""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        try:
            d["files"] = [FileEntry(**f) for f in d["files"]]
            d["upstream"] = {k: Upstream(**v) for k, v in d.get("upstream", {}).items()}
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e

    @property
    def sha256(self) -> str:
        """Content identity of the artifact: hash of everything except the wall-clock time and the whole-repo
        code version (an edit anywhere in the repo must not make downstream stages rerun; the stage identity,
        which is included, covers the code this artifact was built with)."""
        d = dataclasses.asdict(self)
        for k in LINEAGE_ONLY:
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def file(self, rel: str) -> FileEntry:
        for f in self.files:
            if f.path == rel:
                return f
        raise KeyError(rel)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (16 hex) over the source of all our packages, for lineage ("which checkout built this"):
    works without git (fresh clone, wheel install). Not part of any identity: see slip_core/identity.py."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def resolve(root: str, rel: str) -> str:
    """URL of manifest path `rel` of the artifact at `root` (see FileEntry); ManifestError for a path that
    climbs further than one sibling folder."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel:
        raise ManifestError(f"manifest path is not relative: {rel!r}")
    if parts[0] == "..":
        if len(parts) < 3 or any(p in ("", ".", "..") for p in parts[1:]):
            raise ManifestError(f"manifest path leaves the store: {rel!r}")
        return storage.join(str(root).rstrip("/").rsplit("/", 1)[0], *parts[1:])
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"bad manifest path: {rel!r}")
    return storage.join(root, rel)


def relative_to_sibling(sibling: str, rel: str) -> str:
    """Path `rel` of sibling artifact folder `sibling`, as a path of an artifact next to it."""
    return rel if rel.startswith("../") else f"../{sibling}/{rel}"


def hash_files(root: str, rel_paths: list[str]) -> list[FileEntry]:
    entries = []
    for rel in sorted(set(rel_paths)):
        url = storage.join(root, rel)
        entries.append(FileEntry(rel, storage.sha256_file(url), storage.file_size(url)))
    return entries


def build_manifest(
    root: str,
    rel_paths: list[str],
    *,
    kind: str,
    name: str,
    config: dict | None = None,
    upstream: dict[str, Upstream] | None = None,
    metrics: dict | None = None,
    external_files: list[FileEntry] | None = None,
    identity: dict | None = None,
) -> Manifest:
    """`rel_paths` are hashed now; `external_files` (files of sibling artifacts, `../<name>/...`) are taken
    as recorded by the artifact that wrote them and verified with the rest."""
    return Manifest(
        kind=kind,
        name=name,
        files=hash_files(root, rel_paths) + sorted(external_files or [], key=lambda f: f.path),
        config=config or {},
        upstream=upstream or {},
        metrics=metrics or {},
        identity=identity or {},
        code_version=code_version(),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def publish(manifest: Manifest, root: str) -> str:
    """Write `root/manifest.json` atomically (last step of every stage). Returns its URL."""
    url = storage.join(root, MANIFEST_NAME)
    storage.atomic_write_text(url, manifest.to_json())
    return url


def manifest_url(root_or_url: str) -> str:
    s = str(root_or_url)
    return s if s.endswith(".json") else storage.join(s, MANIFEST_NAME)


def artifact_root(manifest_url_: str) -> str:
    return manifest_url_.rsplit("/", 1)[0] if "/" in manifest_url_ else "."


def load_manifest(root_or_url: str) -> Manifest:
    url = manifest_url(root_or_url)
    try:
        text = storage.read_text(url)
    except FileNotFoundError as e:
        raise ManifestError(f"no manifest at {url}") from e
    try:
        return Manifest.from_json(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"unreadable manifest at {url}: {e}") from e


FULL_VERIFY_ENV = "SLIP_FULL_VERIFY"  # =1: every verify re-hashes every file (no size+mtime fast path)


def verify(root_or_url: str, manifest: Manifest | None = None, full: bool | None = None) -> list[str]:
    """Problems found checking the artifact's files against its manifest ([] means it verifies).

    Each file must exist with the recorded size and sha256. By default a file whose size and modification
    stamp (mtime in ns locally, ETag / LastModified on object stores) equal those of an earlier full hash on
    this machine that matched is not read again (storage.sha256_file_stamped): a rerun of a TB-sized
    dataset checks it in seconds, while a rewrite, truncation or replacement of any file changes its stamp
    and is re-hashed. `full=True` (or SLIP_FULL_VERIFY=1) re-hashes everything; so does
    `python -m flows.filter_distributed verify MANIFEST` (on a cluster)."""
    url = manifest_url(root_or_url)
    root = artifact_root(url)
    try:
        manifest = manifest or load_manifest(url)
    except ManifestError as e:
        return [str(e)]
    full = os.environ.get(FULL_VERIFY_ENV, "") == "1" if full is None else full
    problems = []
    for entry in manifest.files:
        try:
            f = resolve(root, entry.path)
        except ManifestError as e:
            problems.append(str(e))
            continue
        if not storage.exists(f):
            problems.append(f"missing: {entry.path}")
        elif storage.file_size(f) != entry.size:
            problems.append(f"size mismatch: {entry.path}")
        elif (storage.sha256_file(f) if full else storage.sha256_file_stamped(f)) != entry.sha256:
            problems.append(f"sha256 mismatch: {entry.path}")
    return problems


def is_complete(root_or_url: str, full: bool | None = None) -> bool:
    """True if the artifact has a manifest and every file matches it (a stage reuses it as it is)."""
    return not verify(root_or_url, full=full)


def load_verified(root_or_url: str, full: bool | None = None) -> Manifest:
    """Load a manifest and insist its files match; raise ManifestError otherwise."""
    m = load_manifest(root_or_url)
    problems = verify(root_or_url, m, full=full)
    if problems:
        raise ManifestError(f"artifact {manifest_url(root_or_url)} does not verify: " + "; ".join(problems))
    return m


def upstream_ref(root_or_url: str, manifest: Manifest | None = None) -> Upstream:
    url = manifest_url(root_or_url)
    m = manifest or load_manifest(url)
    return Upstream(url=url, sha256=m.sha256, kind=m.kind)


def lineage(root_or_url: str, _depth: int = 0, _seen: set | None = None) -> list[tuple[int, str, Manifest | None, str]]:
    """Walk upstream links: [(depth, url, manifest or None, note)] depth-first, cycle-safe."""
    seen = _seen if _seen is not None else set()
    url = manifest_url(root_or_url)
    if url in seen:
        return [(_depth, url, None, "cycle")]
    seen.add(url)
    try:
        m = load_manifest(url)
    except ManifestError as e:
        return [(_depth, url, None, str(e))]
    out = [(_depth, url, m, "")]
    for role, up in sorted(m.upstream.items()):
        if up.kind == RESUME_KIND:  # a checkpoint file of another run: a leaf, not a manifest
            out.append((_depth + 1, up.url, None, f"{role}: checkpoint file sha256 {up.sha256[:12]}"))
            continue
        sub = lineage(up.url, _depth + 1, seen)
        if sub and sub[0][2] is not None and sub[0][2].sha256 != up.sha256:
            d, u, mm, _ = sub[0]
            sub[0] = (d, u, mm, f"changed since use (recorded {up.sha256[:12]}, now {mm.sha256[:12]})")
        out.extend(sub)
    return out


def format_lineage(root_or_url: str) -> str:
    lines = []
    for depth, url, m, note in lineage(root_or_url):
        pad = "  " * depth
        if m is None:
            lines.append(f"{pad}- {url}  [{note}]")
            continue
        metrics = ", ".join(f"{k}={v}" for k, v in list(m.metrics.items())[:6])
        ident = f" identity={m.identity['sha256'][:12]}" if m.identity.get("sha256") else ""
        lines.append(f"{pad}- {m.kind} '{m.name}' sha256={m.sha256[:12]}{ident} code={m.code_version} at {m.created_at}")
        lines.append(f"{pad}  {url}  ({len(m.files)} files{'; ' + metrics if metrics else ''}){'  [' + note + ']' if note else ''}")
        if m.config.get("source"):  # a stage read raw input that is not itself an artifact
            lines.append(f"{pad}  raw input: {m.config['source']} (sha256 {str(m.config.get('source_sha256', ''))[:12]})"
                         + (f" + subset {m.config['subset']}" if m.config.get("subset") else ""))
    return "\n".join(lines)


def local_path(url: str) -> str:
    """Path on this machine for a local URL (file:// or plain path)."""
    fs, path = storage.url_to_fs(url)
    if not storage.is_local(url):
        raise ValueError(f"not a local path: {url}")
    return os.path.abspath(path)




def lock_path(root: str) -> str:
    """Lock of a stage root: a hidden sibling `.<name>.lock` (outside the root, so the artifact folder holds
    only its files and manifest); on an object store that sibling is a lease object (slip_core/locks.py)."""
    if storage.is_local(root):
        path = local_path(root).rstrip("/")
        return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    parent, _, name = str(root).rstrip("/").rpartition("/")
    return f"{parent}/.{name}.lock"


@contextlib.contextmanager
def stage_lock(root: str, timeout_s: float | None = None,
               on_wait: Callable[[str], Any] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of a stage root while its files are built and published.

    Callers re-check `verify(root)` once inside: a run that waited finds the other run's intact manifest and
    reuses it. A dead holder never blocks the next run (locks.py: the kernel drops a local lock with its
    process; an object-store lease of a dead holder is taken over). `timeout_s` bounds the wait (StageBusy
    after it; None waits as long as the holder lives); `on_wait` is told once, naming the holder."""
    def waiting(holder) -> None:
        if on_wait is not None:
            on_wait(f"another run of this stage ({locks.describe(holder)}) is building {root}; "
                    "waiting for it to finish")

    try:
        held = locks.Lease(lock_path(root), purpose="stage run").acquire(timeout_s, waiting)
    except locks.LockBusy as e:
        raise StageBusy(f"another run of this stage still holds {lock_path(root)} after {timeout_s:.0f} s "
                        f"({locks.describe(e.holder)})", e.holder) from None
    with held:
        yield
