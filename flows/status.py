"""What a reproduce run will do, and why: per stage `cached` + artifact, or `will run` + reasons.

`slip status`, `slip reproduce --dry-run` and the reproduce flow itself all call `reproduce_plan`, and each
stage computes its output folder from the same identity functions (datasets.pipeline.table_identity,
datasets.publish.dataset_identity, flows.pretrain.train_identity, flows.evaluate.eval_identity), so the
prediction is the decision: the reproduce flow skips exactly the stages the plan calls cached.
Per stage, Store.status says `cached` or why not, by comparing the identity with the nearest artifact of
the same kind and name in the store: which input changed, which config keys differ, which modules
changed, which library versions changed; or that an artifact of this very identity no longer verifies.

No-op check: computing identities needs the stage configs, i.e. importing the stage modules (torch, timm:
seconds). After a plan finds every stage cached, the identities and artifacts are remembered in
`<store>/.plans/` under a key of everything they are a function of: the request, the reproduce preset,
the contents of the raw inputs, the normalised code of every package including flows/ (identity.all_code),
the library versions and the SLIP_* environment. While that key matches, the artifacts still verify,
their manifests still chain (eval <- checkpoint <- dataset) and the eval data files are unchanged (paths,
sizes, mtimes), the plan is read from there without importing any stage; anything else takes the full path.
"""
from __future__ import annotations

import hashlib
import json
import os
import dataclasses
from dataclasses import asdict, dataclass

from slip_core import artifacts, identity, storage
from slip_core.store import StageStatus, Store

STAGES = ("dataset", "train", "eval")  # the stage kinds, in order; a preset's baselines add train-LABEL, eval-LABEL
PENDING = identity.PENDING


@dataclass(frozen=True)
class Arm:
    """One trained-and-evaluated model of a reproduce preset: the preset's own (stages `train`, `eval`) or a
    baseline on the same dataset artifact (stages `train-LABEL`, `eval-LABEL`)."""
    label: str
    train_preset: str
    train: str
    eval: str


def arms(p) -> list[Arm]:
    """The main arm first, then p.baselines (flows.presets.ReproducePreset)."""
    return [Arm("main", p.train, "train", "eval")] + [Arm(label, tp, f"train-{label}", f"eval-{label}")
                                                      for label, tp in p.baselines]


def stage_names(p) -> list[str]:
    return ["dataset"] + [s for a in arms(p) for s in (a.train, a.eval)]


def forced_stages(rebuild: str | None, names: list[str]) -> set[str]:
    """`--rebuild KIND`: every stage of that kind and of the kinds downstream of it, in every arm."""
    if not rebuild:
        return set()
    return {n for n in names if STAGES.index(n.split("-")[0]) >= STAGES.index(rebuild)}


@dataclass(frozen=True)
class Request:
    """The arguments of one reproduce run (flows.reproduce.reproduce)."""
    preset: str = "tiny"
    store: str = "out/store"
    source: str | None = None
    subset: str | None = None
    rebuild: str | None = None
    dataset_config: dict | None = None
    train_config: dict | None = None
    eval_config: dict | None = None
    demo_corpus: dict | None = None
    nproc: int = 1
    baselines: bool = True  # False: the preset's own model only (no train-LABEL / eval-LABEL stages)


def effective_preset(req: Request, p):
    """The reproduce preset `p` as `req` runs it (without its baselines under baselines=False)."""
    return p if req.baselines else dataclasses.replace(p, baselines=())


# ------------------------------------------------------------------------------------------ full plan
def _dataset_plan(req: Request, st: Store, p, source: str | None, subset: str | None, forced: bool) -> StageStatus:
    from datasets import config, pipeline, publish
    from datasets.sources.detect import detect_source

    cfg = config.make_config(req.dataset_config, p.dataset)
    if source is None:
        return StageStatus("run", None, ["input: the demo corpus is not built yet" if p.demo_corpus else
                                         "input: no --source given (YFCC100M metadata or a url+caption table)"])
    kind = detect_source(source)
    src, sub = pipeline.source_sha256(source, st.root, kind), st.content_sha256(subset) if subset else ""
    table = st.status(pipeline.table_identity(src, sub, kind, cfg))
    plan = st.status(publish.dataset_identity(table.expected_sha256 or PENDING, cfg), forced)
    if table.state != "cached":
        plan.reasons.insert(0, "caption table will be built first: " + "; ".join(table.reasons))
    return plan


def _full_plan(req: Request, st: Store, p, source: str | None, subset: str | None) -> tuple[dict, list]:
    from datasets import prompts
    from flows import evaluate, pretrain
    from slip_core.config import to_dict

    forced = forced_stages(req.rebuild, stage_names(p))
    plans = {"dataset": _dataset_plan(req, st, p, source, subset, "dataset" in forced)}
    eval_cfg = evaluate.make_config(p.eval, req.eval_config)
    jobs = eval_cfg.jobs()
    ref = eval_cfg.reference_prompts
    data = {(t, d): evaluate.data_fingerprint(t, d, eval_cfg.data_root, ref, prepare=False) for t, d in jobs}
    ref_sha = prompts.load_reference(ref).sha256 if ref else ""
    for arm in arms(p):  # every arm: the same dataset, the same train overrides (equal steps), the same eval
        train_cfg = to_dict(pretrain.make_config(arm.train_preset, req.train_config))
        train_ident = pretrain.train_identity(plans["dataset"].expected_sha256 or PENDING, train_cfg, req.nproc)
        plans[arm.train] = st.status(train_ident, arm.train in forced)
        eval_ident = evaluate.eval_identity(train_ident.name, plans[arm.train].expected_sha256 or PENDING, eval_cfg,
                                            data, ref_sha)
        plans[arm.eval] = st.status(eval_ident, arm.eval in forced)
    missing = sorted(f"{t}/{d}" for (t, d), v in data.items() if v == "missing")
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    for e in [a.eval for a in arms(p) if missing and plans[a.eval].state == "run"]:
        plans[e].reasons.append(f"not on disk, recorded as not evaluated: {', '.join(missing[:8])}{more}")
    return plans, [evaluate.data_files(t, d, eval_cfg.data_root, ref) for t, d in jobs]


def _stamp(paths: list[str]) -> str:
    """sha256 over (path, size, mtime) of every file under `paths` (a missing path counts as such)."""
    h = hashlib.sha256()
    for p in paths:
        if os.path.isfile(p):
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        elif os.path.isdir(p):
            for dirpath, dirnames, names in os.walk(p):
                dirnames.sort()
                for n in sorted(names):
                    st = os.stat(os.path.join(dirpath, n))
                    h.update(f"{dirpath}/{n}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(f"{p}\0absent\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ no-op memo
def _memo_key(req: Request, p, st: Store, source: str | None, subset: str | None) -> str | None:
    """None (no no-op check) for a source that is not one file, e.g. a folder of parquet files."""
    for u in (source, subset):
        if u:
            fs, path = storage.url_to_fs(u)
            if not fs.isfile(path):
                return None
    raw = [st.content_sha256(u) if u else "" for u in (source, subset)]
    env = {k: v for k, v in os.environ.items() if k.startswith("SLIP_")}  # data roots etc. that configs read
    blob = {"request": {**asdict(req), "rebuild": None}, "preset": asdict(p), "raw": [source, subset, *raw],
            "code": identity.all_code(), "env": env}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _memo_read(st: Store, key: str) -> dict | None:
    url = storage.join(st.plan_cache(), f"{key[:32]}.json")
    try:
        memo = json.loads(storage.read_text(url))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    names = list(memo["stages"])
    urls = {s: memo["stages"][s]["artifact"] for s in names}
    manifests = {}
    for s in names:
        try:
            manifests[s] = artifacts.load_manifest(urls[s])
        except artifacts.ManifestError:
            return None
        if manifests[s].identity.get("sha256") != memo["stages"][s]["identity"] or st.check(urls[s], manifests[s]):
            return None
    def input_of(stage: str, role: str) -> str | None:
        return manifests[stage].identity.get("inputs", {}).get(role)

    trains = [s for s in names if s.split("-")[0] == "train"]  # eval-X is chained to train-X
    chained = all(input_of(t, "dataset") == manifests["dataset"].sha256
                  and input_of(t.replace("train", "eval", 1), "checkpoint") == manifests[t].sha256 for t in trains)
    if not chained or _stamp(memo["eval_data"]) != memo["eval_stamp"]:
        return None
    return {s: StageStatus("cached", urls[s], [], manifests[s].sha256, manifests[s].identity["sha256"]) for s in names}


def _memo_write(st: Store, key: str, plans: dict[str, StageStatus], watched: list[list[str]]) -> None:
    paths = sorted({p for w in watched for p in w})
    memo = {"stages": {s: {"artifact": plans[s].artifact, "identity": plans[s].identity} for s in plans},
            "eval_data": paths, "eval_stamp": _stamp(paths)}
    storage.atomic_write_text(storage.join(st.plan_cache(), f"{key[:32]}.json"), json.dumps(memo, indent=1))


# ------------------------------------------------------------------------------------------ entry points
def demo_source(req: Request, p, build: bool) -> tuple[str | None, str | None, object | None]:
    """(source, subset, DemoCorpus or None) of a request with reproduce preset `p`: its own, or the preset's
    demo corpus (built only when `build`; a dry run reads an existing one)."""
    if req.source is not None or not p.demo_corpus:
        return req.source, req.subset, None
    from datasets import demo_corpus

    out = os.path.join(Store(req.store).local_dir("raw"), "demo-corpus")
    corpus = (demo_corpus.build_demo_corpus if build else demo_corpus.existing_demo_corpus)(out, **(req.demo_corpus or {}))
    return (corpus.metadata, corpus.subset, corpus) if corpus else (None, None, None)


def reproduce_plan(req: Request, p, source: str | None = None, subset: str | None = None) -> dict[str, StageStatus]:
    """The plan of `req` with reproduce preset `p` (flows.presets.ReproducePreset; `source`/`subset`: as
    resolved by demo_source). Remembers an all-cached plan for the next no-op."""
    st = Store(req.store)
    key = _memo_key(req, p, st, source, subset) if source else None
    if key and not req.rebuild:
        memo = _memo_read(st, key)
        if memo:
            return memo
    plans, watched = _full_plan(req, st, p, source, subset)
    if key and all(pl.state == "cached" for pl in plans.values()):
        _memo_write(st, key, plans, watched)
    return plans


def to_json(plans: dict[str, StageStatus]) -> dict:
    return {"stages": {s: pl.to_json() for s, pl in plans.items()}}


def format_plan(plans: dict[str, StageStatus]) -> str:
    lines = []
    for s, pl in plans.items():
        if pl.state == "cached":
            lines.append(f"{s:<11} cached    {pl.artifact}")
        else:
            lines.append(f"{s:<11} will run")
            lines.extend(f"           - {r}" for r in pl.reasons)
    return "\n".join(lines)


def to_markdown(plans: dict[str, StageStatus]) -> str:
    rows = ["| stage | state | artifact / reasons |", "|---|---|---|"]
    for s, pl in plans.items():
        what = f"`{pl.artifact}`" if pl.state == "cached" else "<br>".join(r.replace("|", "\\|") for r in pl.reasons)
        rows.append(f"| {s} | {'cached' if pl.state == 'cached' else 'will run'} | {what} |")
    return "# What this run does, and why\n\n" + "\n".join(rows)
