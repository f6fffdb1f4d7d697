"""The artifact store's layout, in one place: every stage, the scheduler and the CLI go through `Store`.

    <store>/<kind>/<name>-<identity hash>/   a stage output (manifest.json + files), kind = caption-table |
                                             dataset | checkpoint | eval | report
    <store>/<kind>/.<name>-<hash>.lock       its lock (artifacts.stage_lock: a flock, or a lease object on s3://)
    <store>/<stage>-work/<key>/              resumable work state of a stage (dataset-work: downloads)
    <store>/<kind>/<name>-<hash>/run/        a training run in progress (object stores: in the local cache)
    <store>/.hashcache/                      content hashes of large raw inputs, by (url, size, mtime)
    <store>/.plans/                          the last identities computed per reproduce request (no-op check)
    <store>/raw/                             inputs we generate (the demo corpus); object stores: local cache
    <store>/.prefect/                        a persistent Prefect server's home (`slip server start`)

A stage output's folder is named by its stage identity (slip_core/identity.py), so the same inputs, config,
code and libraries find the same folder, and anything else gets a new one while old versions stay
readable for lineage. `find`, `nearest` and `latest` read the manifests back (scheduler, `slip status`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from slip_core import artifacts, storage
from slip_core.identity import StageIdentity, differences, distance

@dataclass
class StageStatus:
    """What a stage with a given identity would do against a store (Store.status)."""
    state: str  # "cached" | "run"
    artifact: str | None = None  # manifest URL when cached
    reasons: list[str] = field(default_factory=list)
    expected_sha256: str | None = None  # manifest sha256 downstream stages will see (None: not known yet)
    identity: str = ""

    def to_json(self) -> dict:
        return {"state": self.state, "artifact": self.artifact, "reasons": self.reasons}

    def line(self) -> str:
        return f"cached  {self.artifact}" if self.state == "cached" else "will run: " + "; ".join(self.reasons)


def default_root() -> str:
    """$SLIP_STORE, else ./out/store: the default of every `--store` flag."""
    return os.environ.get("SLIP_STORE") or os.path.join(os.getcwd(), "out", "store")


@dataclass(frozen=True)
class Store:
    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", str(self.root).rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.root)

    # ------------------------------------------------------------------------------------ stage outputs
    def stage_root(self, ident: StageIdentity, *extra: Any) -> str:
        """Folder of the output of `ident`; `extra`: what else names one publication of the same identity
        (the dataset's ledger fingerprint: a retry of failed downloads publishes next to the first)."""
        key = ident.sha256 if not extra else hashlib.sha256(
            json.dumps([ident.sha256, list(extra)], sort_keys=True, default=str).encode()).hexdigest()
        return storage.join(self.root, ident.kind, f"{ident.name}-{key[:16]}")

    def manifests(self, kind: str) -> list[str]:
        """Manifest URLs of every `kind` artifact in the store (complete or not), sorted by folder."""
        fs, root = storage.url_to_fs(storage.join(self.root, kind))
        found = fs.glob(f"{root}/*/{artifacts.MANIFEST_NAME}")
        proto = "" if self.is_local else f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://"
        return sorted(proto + p for p in found)

    def published(self, kind: str, name: str | None = None) -> Iterator[tuple[str, artifacts.Manifest]]:
        """(manifest URL, manifest) of readable `kind` manifests, newest first; unreadable ones are skipped."""
        found = []
        for url in self.manifests(kind):
            try:
                m = artifacts.load_manifest(url)
            except artifacts.ManifestError:
                continue
            if name is None or m.name == name:
                found.append((url, m))
        return iter(sorted(found, key=lambda um: um[1].created_at, reverse=True))

    def latest(self, kind: str, name: str | None = None) -> str | None:
        """Manifest URL of the newest `kind` artifact that verifies."""
        return next((url for url, m in self.published(kind, name) if not self.check(url, m)), None)

    def find(self, ident: StageIdentity) -> list[tuple[str, artifacts.Manifest]]:
        """Artifacts built under exactly this identity, newest first (usually one; a dataset may have several
        publications, one per ledger)."""
        return [(u, m) for u, m in self.published(ident.kind, ident.name) if m.identity.get("sha256") == ident.sha256]

    def nearest(self, ident: StageIdentity) -> tuple[str, artifacts.Manifest] | None:
        """The artifact of the same kind and name whose recorded identity differs least from `ident` (ties:
        the newest), to explain what changed; None if the store has none with a recorded identity."""
        new = ident.to_dict()
        best = None
        for url, m in self.published(ident.kind, ident.name):
            if m.identity:
                d = distance(m.identity, new)
                if best is None or d < best[0]:
                    best = (d, url, m)
        return None if best is None else (best[1], best[2])

    def status(self, ident: StageIdentity, forced: bool = False) -> StageStatus:
        """`cached` if the newest artifact of this identity verifies, else `run` and why: differences from the
        nearest artifact of the same kind and name (inputs, config keys, modules, libraries), or a damaged
        artifact of this identity (rebuilt in place: downstream expects the same manifest again)."""
        found = self.find(ident)
        if forced:
            return StageStatus("run", None, ["forced by --rebuild"], identity=ident.sha256)
        if found:
            url, m = found[0]
            problems = self.check(url, m)
            if not problems:
                return StageStatus("cached", url, [], m.sha256, ident.sha256)
            return StageStatus("run", None, [f"artifact {url} of this identity does not verify "
                                             f"({'; '.join(problems[:3])}): rebuilt in place"], m.sha256, ident.sha256)
        near = self.nearest(ident)
        if near is None:
            old = sum(1 for _ in self.published(ident.kind, ident.name))
            why = f"no earlier {ident.kind} '{ident.name}' artifact in {self.root}" + (
                f" with a recorded identity ({old} older one(s) predate stage identities)" if old else "")
            return StageStatus("run", None, [why], identity=ident.sha256)
        url, m = near
        reasons = differences(m.identity, ident.to_dict()) or ["same identity as a differently published artifact"]
        return StageStatus("run", None, reasons + [f"compared with {url}"], identity=ident.sha256)

    def check(self, url: str, manifest: artifacts.Manifest | None = None) -> list[str]:
        """Problems with an artifact ([] = usable): artifacts.verify, whose size+mtime stamps make a rerun's
        check of TBs of shards take seconds while any rewritten file is re-hashed."""
        return artifacts.verify(url, manifest)

    # ------------------------------------------------------------------------------- work, caches, locks
    def work_dir(self, stage: str, key: str) -> str:
        """Resumable work state of a stage, e.g. work_dir("dataset", "demo-<hash>") -> <store>/dataset-work/..."""
        return storage.join(self.root, f"{stage}-work", key)

    def run_dir(self, stage_root: str) -> str:
        """Local folder a training run writes while it runs (checkpoints/latest lives here): inside the stage
        folder for a local store, else in the local cache under the same folder name."""
        if storage.is_local(stage_root):
            return artifacts.local_path(storage.join(stage_root, "run"))
        return os.path.join(storage.CACHE_HOME, "runs", stage_root.rstrip("/").rsplit("/", 1)[-1])

    def local_dir(self, name: str) -> str:
        """A local folder for inputs we generate (e.g. "raw"): in the store when it is local, else in the cache."""
        if self.is_local:
            return artifacts.local_path(storage.join(self.root, name))
        return os.path.join(storage.CACHE_HOME, name)

    def hash_cache(self) -> str:
        return storage.join(self.root, ".hashcache")

    def content_sha256(self, url: str) -> str:
        """sha256 of a file's contents, remembered in `.hashcache/` under its stamp (storage.sha256_file_stamped),
        so an unchanged 50 GB metadata file is hashed once, not on every scheduled rerun."""
        return storage.sha256_file_stamped(url, self.hash_cache())

    def plan_cache(self) -> str:
        return storage.join(self.root, ".plans")

    def prefect_home(self) -> str:
        """Where `slip server start --store` keeps its database and pid file."""
        if self.is_local:
            return artifacts.local_path(storage.join(self.root, ".prefect"))
        return os.path.join(storage.CACHE_HOME, "prefect")

    def lock(self, stage_root: str, timeout_s: float | None = None, on_wait=None):
        """The stage lock of one of this store's stage folders (artifacts.stage_lock)."""
        return artifacts.stage_lock(stage_root, timeout_s=timeout_s, on_wait=on_wait)

    def lock_path(self, stage_root: str) -> str:
        return artifacts.lock_path(stage_root)
