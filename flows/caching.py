"""Cache policies for stage tasks.

Prefect's default policy includes the run id (no reuse across runs) and hashes a path by its string
(stale hits after a file changes). Stage tasks instead key on *contents*: a path argument that names
a file is hashed by its bytes, one that names an artifact (folder or manifest.json) by its manifest's
sha256; everything else by value. The rest of the key is the stage's code identity (slip_core/identity.py:
the normalised code its entry modules reach, and their library versions), never the task function's
source: flows are glue, and a comment in one must not rerun a stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from slip_core import artifacts, identity, storage


def content_key(value: Any) -> Any:
    """Replace file/artifact references by their content hash, recursively."""
    if isinstance(value, (str, Path)):
        s = str(value)
        if "\n" in s or len(s) > 4096:
            return s
        try:
            if s.endswith(artifacts.MANIFEST_NAME) and storage.exists(s):
                return {"manifest": artifacts.load_manifest(s).sha256}
            if storage.is_local(s) and os.path.isdir(s) and os.path.exists(os.path.join(s, artifacts.MANIFEST_NAME)):
                return {"manifest": artifacts.load_manifest(s).sha256}
            if storage.is_local(s) and os.path.isfile(s):
                return {"file": storage.sha256_file(s)}
        except (OSError, ValueError, artifacts.ManifestError):
            return s
        return s
    if isinstance(value, dict):
        return {str(k): content_key(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [content_key(v) for v in value]
    return value


@dataclass
class ContentInputs(CachePolicy):
    """Key = content hashes of the inputs + the code identity of the stage's entry modules."""

    code: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        kept = {k: content_key(v) for k, v in sorted(inputs.items()) if k not in self.exclude}
        return hash_objects(kept, identity.code(self.code, stop=self.stop).sha256, raise_on_failure=True)


def stage_cache(code: Iterable[str], *exclude: str, stop: Iterable[str] = ()) -> ContentInputs:
    """The policy of a stage task: its inputs by content (minus `exclude`, e.g. a progress flag or a timeout)
    plus the code identity of the stage's entry modules `code` (not entering `stop`, as the stage's identity)."""
    codes = tuple(code)
    if not codes or isinstance(code, str):
        raise ValueError("stage_cache needs the stage's entry modules, e.g. stage_cache(TRAIN_CODE, 'timeout_s')")
    return ContentInputs(code=codes, exclude=tuple(exclude), stop=tuple(stop))


def refreshing() -> bool:
    """True inside a forced rebuild (`reproduce --rebuild`, PREFECT_TASKS_REFRESH_CACHE): stages must then
    recompute even when a complete artifact for the same inputs already exists."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    return bool(PREFECT_TASKS_REFRESH_CACHE.value())
