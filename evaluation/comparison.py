"""The paper's Table 2, ours: one row per trained model (CLIP, SimCLR, SLIP), one column per (task, eval set).

Rows are read from artifacts only: the eval manifest's results.json and the checkpoint manifest's metrics
(train_time_s, steps, global batch) and metrics.jsonl (logged samples/s). `paper_rows` gives the paper's
ViT-B/16 YFCC15M 25-epoch numbers (evaluation.report.PAPER_IMAGENET) to set beside ours: at demo scale only the
*ordering* of the methods can be compared, not the values. `aggregate` turns several seeds per method into
mean ± std (slip study).
"""
from __future__ import annotations

import html
import json
import statistics

from evaluation.report import PAPER_IMAGENET
from slip_core import artifacts, storage

TASK_ORDER = ("zeroshot", "linear", "finetune", "retrieval")
COST_COLS = ("steps", "train_time_s", "samples_per_s")
PAPER_SETTING = ("VITB16", "yfcc15m", 25)  # Table 2's ViT-B/16 rows


def read_jsonl(url: str) -> list[dict]:
    rows = []
    for line in storage.read_text(url).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def artifact_file(url: str, suffix: str) -> str | None:
    """URL of the manifest's first file ending in `suffix`, or None."""
    m = artifacts.load_manifest(url)
    root = artifacts.artifact_root(artifacts.manifest_url(url))
    return next((storage.join(root, f.path) for f in m.files if f.path.endswith(suffix)), None)


def method_of(model: str) -> str:
    """'SLIP_VIT_TINY' / 'clip_vit_tiny' -> 'SLIP' / 'CLIP' (the loss family, the row label of Table 2)."""
    return str(model).split("_")[0].upper()


def training_cost(checkpoint_url: str) -> dict:
    """steps, wall time of the trainer (s) and its mean logged throughput (samples/s) from the checkpoint artifact."""
    m = artifacts.load_manifest(checkpoint_url)
    cost = {"steps": m.metrics.get("steps"), "train_time_s": m.metrics.get("train_time_s")}
    metrics = artifact_file(checkpoint_url, "metrics.jsonl")
    rates = [r["samples_per_s"] for r in read_jsonl(metrics) if "samples_per_s" in r] if metrics else []
    if len(rates) > 2:
        rates = rates[1:]  # the first window includes loader start-up
    cost["samples_per_s"] = round(statistics.fmean(rates), 2) if rates else None
    return cost


def arm_row(checkpoint_url: str, eval_url: str, label: str | None = None) -> dict:
    """{"method", "model", "results": {"task/dataset": value}, steps, train_time_s, samples_per_s}."""
    ck = artifacts.load_manifest(checkpoint_url)
    model = str(ck.config.get("model") or ck.name)
    results_url = artifact_file(eval_url, "results.json")
    results = json.loads(storage.read_text(results_url)) if results_url else []
    values = {f"{r['task']}/{r['dataset']}": float(r["value"]) for r in results if r.get("value") is not None}
    return {"method": label or method_of(model), "model": model, "results": values, **training_cost(checkpoint_url)}


def result_columns(rows: list[dict]) -> list[str]:
    """'task/dataset' keys present in any row, by dataset within the order zero-shot, linear, fine-tune, retrieval."""
    keys = {k for r in rows for k in r["results"]}
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k.split("/")[0], len(rank)), k.split("/", 1)[1]))


def paper_rows(methods: list[str]) -> list[dict]:
    """The paper's ImageNet numbers for these methods in the ViT-B/16 YFCC15M 25-epoch setting (None: not in Table 2)."""
    vit, data, epochs = PAPER_SETTING
    out = []
    for method in methods:
        nums = PAPER_IMAGENET.get((f"{method}_{vit}", data, epochs))
        if nums:
            out.append({"method": method, **{t: nums.get(t) for t in ("zeroshot", "linear", "finetune")}})
    return out


def ordering(rows: list[dict], a: str, b: str) -> tuple[int, int]:
    """(columns where method `a` beats `b`, columns both have): the paper's claim is SLIP > CLIP on every one."""
    ra = next((r for r in rows if r["method"] == a), None)
    rb = next((r for r in rows if r["method"] == b), None)
    if ra is None or rb is None:
        return 0, 0
    both = [k for k in ra["results"] if k in rb["results"]]
    return sum(_mean(ra["results"][k]) > _mean(rb["results"][k]) for k in both), len(both)


def _mean(v) -> float:
    return v["mean"] if isinstance(v, dict) else float(v)


def aggregate(runs: list[dict]) -> list[dict]:
    """Rows of several seeds per method -> one row per method (first-seen order) with {"mean", "std", "n"} values."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)

    def stat(vals: list[float]) -> dict:
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}

    out = []
    for method, rs in by.items():
        keys = sorted({k for r in rs for k in r["results"]})
        row = {"method": method, "model": rs[0]["model"],
               "results": {k: stat([r["results"][k] for r in rs if k in r["results"]]) for k in keys}}
        for c in COST_COLS:
            vals = [float(r[c]) for r in rs if r.get(c) is not None]
            row[c] = stat(vals) if vals else None
        out.append(row)
    return out


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of Table 2: method, one column per task/dataset, then the training cost."""
    cols = result_columns(rows)
    base = next((_mean(r["train_time_s"]) for r in rows if r.get("train_time_s")), None)
    header = ["method", *cols, "steps", "train wall time (s)", "samples/s", "cost vs first row"]
    body = []
    for r in rows:
        t = r.get("train_time_s")
        rel = f"{_mean(t) / base:.2f}×" if t and base else "–"
        body.append([r["method"], *[fmt(r["results"].get(c)) for c in cols], fmt(r.get("steps"), 0),
                     fmt(r.get("train_time_s")), fmt(r.get("samples_per_s")), rel])
    return header, body


def to_markdown(rows: list[dict]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    paper = paper_rows([r["method"] for r in rows])
    if paper:
        lines += ["", "Paper, ViT-B/16 on YFCC15M, 25 epochs, ImageNet top-1 (Table 2):", "",
                  "| method | zero-shot | linear | fine-tune |", "|---|---|---|---|"]
        lines += [f"| {p['method']} | {fmt(p['zeroshot'])} | {fmt(p['linear'])} | {fmt(p['finetune'])} |" for p in paper]
    return "\n".join(lines)


def to_html(rows: list[dict]) -> str:
    """The comparison section of the pipeline report: ours, the paper's beside it, and the ordering check."""
    def table(header, body):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        return "<table><tr>" + head + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body) + "</table>"

    header, body = table_cells(rows)
    parts = ["<h2>CLIP vs SLIP (paper Table 2 layout)</h2>",
             "<p>Same dataset artifact, same schedule (equal steps), same evaluation; values in % "
             "(zero-shot / linear: top-1 or the set's metric; retrieval: mean recall).</p>",
             "<div style='display:flex;gap:2em;align-items:flex-start'><div><h3>Ours</h3>", table(header, body), "</div>"]
    paper = paper_rows([r["method"] for r in rows])
    if paper:
        parts += ["<div><h3>Paper: ViT-B/16, YFCC15M, 25 ep (ImageNet)</h3>",
                  table(["method", "zero-shot", "linear", "fine-tune"],
                        [[p["method"], fmt(p["zeroshot"]), fmt(p["linear"]), fmt(p["finetune"])] for p in paper]), "</div>"]
    parts.append("</div>")
    won, n = ordering(rows, "SLIP", "CLIP")
    if n:
        parts.append(f"<p>Ordering: SLIP above CLIP on {won} of {n} columns (paper: on every zero-shot and linear "
                     "column). At demo scale only the ordering is comparable, not the values.</p>")
    return "\n".join(parts)
