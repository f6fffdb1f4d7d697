"""Stage identity: what a stage's output depends on, and nothing else.

A stage's identity is a sha256 over
  - the content hashes of its inputs (upstream manifests' sha256, raw files' sha256),
  - its resolved config,
  - the code the stage executes: the transitive closure of imports from its entry modules inside our
    library packages (LIBRARY_PACKAGES), read from the source with `ast` (nothing is imported), each module
    hashed by its *normalised* AST, and
  - the versions of the third-party distributions that code imports (importlib.metadata) and Python's.

Normalised AST = `ast.dump` without line numbers, docstrings or `help=`/`description=`/`epilog=` string
arguments, so a comment, docstring, blank line or help-text edit changes no identity, while any change
to what the code does changes the identity of exactly the stages whose closure contains that module.
`flows/` (Prefect glue and CLI), tests, benches and docs are not library packages: editing them reruns
nothing. Besides `import` statements, a string constant that names one of our modules counts as an
import: that is how a stage launches code in a subprocess (`python -m slip_core.trainer`).

Cheap on purpose (every stage task and every `slip status` computes identities): module parses are memoised
per process and on disk (storage.CACHE_HOME/identity/) by path, size and mtime, and the module ->
distribution map by the list of installed distributions (whose folder names carry their versions).
`differences` explains, key by key, why two identities differ (`slip status`, `slip reproduce --dry-run`).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from slip_core import storage

SOURCE_ROOT = Path(__file__).resolve().parent.parent
LIBRARY_PACKAGES = ("slip_core", "datasets", "evaluation")  # `evaluation` once it exists as a top-level package
DOC_KEYWORDS = frozenset({"help", "description", "epilog"})
# Not stage code: how identities are computed and stage folders named. A change there that matters changes
# every identity (module hashes) or folder name by itself; counting these modules would add nothing.
INFRASTRUCTURE = ("slip_core.identity", "slip_core.store")
PENDING = "<built by this run>"  # the input hash of a stage whose upstream has not been built yet
KEEP_LISTINGS = 8  # environments (sys.path listings) whose distribution map stays memoised
NORMALISATION = 1  # bump when _Normalise changes: invalidates the on-disk parse memo


class _DiskMemo:
    """A JSON dict in the local cache, loaded once per process, written back (atomically) when it grew."""

    def __init__(self, name: str):
        self.path = os.path.join(storage.CACHE_HOME, "identity", name)
        self.data: dict | None = None
        self.dirty = False

    def get(self, key: str):
        if self.data is None:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except (OSError, ValueError):
                self.data = {}
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.get(key)
        self.data[key] = value
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError):  # a read-only home only costs the next process a re-parse
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
            self.dirty = False


_PARSES = _DiskMemo(f"modules-n{NORMALISATION}-py{sys.version_info.major}{sys.version_info.minor}.json")
_DISTS = _DiskMemo("distributions.json")


# ------------------------------------------------------------------------------------------ modules
@dataclass(frozen=True)
class ModuleInfo:
    name: str
    sha256: str  # of the normalised AST
    imports: frozenset[str]  # absolute module names this module may import (ours and third-party)


class _Normalise(ast.NodeTransformer):
    """Drop what does not change behaviour: docstrings and documentation-only keyword strings."""

    def generic_visit(self, node):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        return super().generic_visit(node)

    def visit_keyword(self, node):
        if node.arg in DOC_KEYWORDS and isinstance(node.value, (ast.Constant, ast.JoinedStr)):
            return None
        return self.generic_visit(node)


def _module_path(root: Path, name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in LIBRARY_PACKAGES:
        return None
    base = root.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports_of(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            s = node.value
            if "." in s and s.partition(".")[0] in LIBRARY_PACKAGES and s.replace(".", "").replace("_", "").isalnum():
                found.add(s)  # `python -m slip_core.trainer`, importlib.import_module("...")
    return {f for f in found if f and f != "__future__"}


@functools.lru_cache(maxsize=None)
def _parse(path: str, size: int, mtime_ns: int, name: str) -> ModuleInfo:
    key = f"{path}\0{size}\0{mtime_ns}\0{name}"
    hit = _PARSES.get(key)
    if hit:
        return ModuleInfo(name, hit[0], frozenset(hit[1]))
    source = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(source, filename=path)
    imports = _imports_of(tree, name, path.endswith("__init__.py"))
    digest = hashlib.sha256(ast.dump(_Normalise().visit(tree)).encode()).hexdigest()
    _PARSES.put(key, [digest, sorted(imports)])
    return ModuleInfo(name, digest, frozenset(imports))


def module_info(name: str, root: Path | str | None = None) -> ModuleInfo | None:
    """Parse one of our modules (None if `name` is not a module of our library packages under `root`)."""
    p = _module_path(Path(root or SOURCE_ROOT), name)
    if p is None:
        return None
    st = p.stat()
    return _parse(str(p), st.st_size, st.st_mtime_ns, name)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(entries: Iterable[str], root: Path | str | None = None,
            stop: Iterable[str] = ()) -> tuple[dict[str, ModuleInfo], set[str]]:
    """({module: info} of our modules reachable from `entries` (incl. the packages they live in),
    top-level names of the third-party modules they import). Modules in `stop` are not entered: a stage
    names there what a disabled feature would import (see datasets.pipeline.dataset_identity)."""
    root = Path(root or SOURCE_ROOT)
    ours: dict[str, ModuleInfo] = {}
    third: set[str] = set()
    todo, stop = list(entries), set(stop) | set(INFRASTRUCTURE)
    for e in todo:
        if module_info(e, root) is None:
            raise ValueError(f"stage entry module {e!r} not found under {root}")
    while todo:
        name = todo.pop()
        if name in ours or name in stop:
            continue
        top = name.partition(".")[0]
        if top not in LIBRARY_PACKAGES:
            if top not in sys.stdlib_module_names:
                third.add(top)
            continue
        info = module_info(name, root)
        if info is None:  # `from pkg import attr`: attr is not a submodule
            continue
        ours[name] = info
        todo.extend(_parents(name))
        todo.extend(info.imports)
    return ours, third


# ------------------------------------------------------------------------------------------ libraries
@functools.lru_cache(maxsize=1)
def _installed() -> dict:
    """{"modules": top-level module -> distributions, "versions": {}} for what is installed on sys.path now,
    memoised on disk under the listing of every sys.path entry's *.dist-info / *.egg-info folders."""
    h = hashlib.sha256()
    for entry in sys.path:
        with contextlib.suppress(OSError):
            names = sorted(n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info")))
            if names:  # a script's folder on sys.path[0] holds none: it must not change the key
                h.update(json.dumps([os.path.abspath(entry or "."), names]).encode())
    key = h.hexdigest()
    hit = _DISTS.get(key)
    if hit is None:
        hit = {"modules": importlib.metadata.packages_distributions(), "versions": {}}
        for old in list(_DISTS.data)[:-(KEEP_LISTINGS - 1)]:
            del _DISTS.data[old]
        _DISTS.put(key, hit)
    return hit


def _version(dist: str) -> str | None:
    versions = _installed()["versions"]
    if dist not in versions:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
        _DISTS.dirty = True
    return versions[dist]


def library_versions(top_level_modules: Iterable[str]) -> dict[str, str]:
    """{distribution: version} for installed distributions providing these modules, plus Python's
    major.minor (a module with no installed distribution — an optional tracker — is left out)."""
    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    dists = _installed()["modules"]
    for mod in sorted(top_level_modules):
        for dist in sorted(set(dists.get(mod, ()))):
            v = _version(dist)
            if v is not None:
                out[dist.lower()] = v
    _DISTS.save()
    return out


# ------------------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class Code:
    modules: dict[str, str]  # module name -> normalised-AST sha256
    libraries: dict[str, str]  # distribution -> version

    @property
    def sha256(self) -> str:
        return _sha([self.modules, self.libraries])


@functools.lru_cache(maxsize=None)
def _code(entries: tuple[str, ...], root: str, stop: tuple[str, ...]) -> Code:
    ours, third = closure(entries, root, stop)
    _PARSES.save()
    return Code({n: i.sha256 for n, i in sorted(ours.items())}, library_versions(third))


def code(entries: Iterable[str], root: Path | str | None = None, stop: Iterable[str] = ()) -> Code:
    """The code a stage executes, from its entry modules (cached per process)."""
    return _code(tuple(sorted(set(entries))), str(Path(root or SOURCE_ROOT)), tuple(sorted(set(stop))))


@dataclass(frozen=True)
class StageIdentity:
    kind: str  # artifact kind: caption-table | dataset | checkpoint | eval | report
    name: str
    inputs: dict[str, Any]  # role -> content hash of the input
    config: dict[str, Any]  # resolved config the output depends on
    code: Code = field(repr=False, default_factory=lambda: Code({}, {}))

    @property
    def sha256(self) -> str:
        return _sha([self.kind, self.name, self.inputs, self.config, self.code.modules, self.code.libraries])

    def to_dict(self) -> dict:
        """What a manifest records (`Manifest.identity`): enough to explain a later difference."""
        return {"sha256": self.sha256, "inputs": self.inputs, "config": self.config,
                "code": {"sha256": self.code.sha256, "modules": self.code.modules}, "libraries": self.code.libraries}


def stage(kind: str, name: str, inputs: dict, config: dict, entries: Iterable[str],
          stop: Iterable[str] = (), root: Path | str | None = None) -> StageIdentity:
    """The identity of one stage run (`root`: the source tree to read, default the one imported)."""
    return StageIdentity(kind, name, _plain(inputs), _plain(config), code(entries, root, stop))


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def all_code(root: Path | str | None = None, packages: Iterable[str] = LIBRARY_PACKAGES + ("flows",)) -> str:
    """sha256 over the normalised AST of every module of `packages` (the no-op check of `slip reproduce`:
    if nothing here changed, no stage identity can have changed)."""
    root = Path(root or SOURCE_ROOT)
    h = hashlib.sha256()
    third: set[str] = set()
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            rel = p.relative_to(root).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            st = p.stat()
            info = _parse(str(p), st.st_size, st.st_mtime_ns, name)
            h.update(f"{name}\0{info.sha256}\n".encode())
            third.update(i.partition(".")[0] for i in info.imports)
    _PARSES.save()
    third -= set(sys.stdlib_module_names) | set(LIBRARY_PACKAGES) | {"flows"}
    h.update(json.dumps(library_versions(third), sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ explain
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if len(s) <= 40:
        return s
    return s[:12] + "…" if len(s) == 64 else s[:37] + "…"  # a sha256: its prefix is enough


def differences(old: dict, new: dict, max_items: int = 8) -> list[str]:
    """Why identity `new` (StageIdentity.to_dict()) differs from recorded identity `old`, one reason per
    kind of difference: inputs, config keys, code modules, libraries."""
    reasons = []
    for label, a, b in (("input changed", old.get("inputs", {}), new.get("inputs", {})),
                        ("config changed", _flatten(old.get("config", {})), _flatten(new.get("config", {}))),
                        ("library changed", old.get("libraries", {}), new.get("libraries", {}))):
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
        if keys:
            items = [f"{k} ({_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))})" for k in keys[:max_items]]
            reasons.append(f"{label}: " + ", ".join(items) + (f" and {len(keys) - max_items} more" if len(keys) > max_items else ""))
    a, b = old.get("code", {}).get("modules", {}), new.get("code", {}).get("modules", {})
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    parts = [", ".join(changed[:max_items]) + (f" and {len(changed) - max_items} more" if len(changed) > max_items else "")
             if changed else "", f"added {', '.join(added[:max_items])}" if added else "",
             f"removed {', '.join(removed[:max_items])}" if removed else ""]
    if any(parts):
        reasons.append("code changed: " + "; ".join(p for p in parts if p))
    return reasons


def distance(old: dict, new: dict) -> int:
    """How many things differ (to pick the nearest earlier artifact to explain a change against)."""
    n = 0
    for key in ("inputs", "libraries"):
        a, b = old.get(key, {}), new.get(key, {})
        n += sum(a.get(k) != b.get(k) for k in set(a) | set(b))
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    n += sum(a.get(k) != b.get(k) for k in set(a) | set(b))
    a, b = old.get("code", {}).get("modules", {}), new.get("code", {}).get("modules", {})
    return n + sum(a.get(k) != b.get(k) for k in set(a) | set(b))
