"""The end-of-pipeline HTML report: the method comparison (when baselines were trained), ledger summary, loss
curve, per-dataset bars, lineage.

Built only from artifact manifests and the files they list (never from live objects), so it can be
regenerated for any past run. Images are embedded as data URIs: the report is one portable file.
"""
from __future__ import annotations

import base64
import html
import io
import json

from evaluation import comparison, train_curve
from slip_core import artifacts, storage


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def loss_curve(metrics: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [r["step"] for r in metrics if "step" in r and "loss" in r]
    for key in ("loss", "clip_loss", "ssl_loss"):
        ys = [r[key] for r in metrics if "step" in r and key in r]
        if ys and len(ys) == len(steps):
            ax.plot(steps, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def result_bars(results: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dataset']}\n{r['task']}" for r in results]
    values = [float(r["value"]) for r in results]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(values) + 1), 3.2))
    ax.bar(range(len(values)), values, color="#4c72b0")
    for i, r in enumerate(results):
        if r.get("chance") is not None:
            ax.hlines(float(r["chance"]), i - 0.4, i + 0.4, colors="red", linestyles="dashed")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("value (red dash: chance)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _find(manifest: artifacts.Manifest, suffix: str) -> str | None:
    for f in manifest.files:
        if f.path.endswith(suffix):
            return f.path
    return None


def build_report(dataset_url: str, checkpoint_url: str, eval_url: str,
                 baselines: list[tuple[str, str]] = ()) -> str:
    """HTML text of the pipeline report for three stage manifests; `baselines`: (checkpoint, eval) manifest URLs
    of models trained on the same dataset for comparison (shown first, side by side in Table 2's layout)."""
    ds, ck, ev = (artifacts.load_manifest(u) for u in (dataset_url, checkpoint_url, eval_url))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>slip-pipeline report</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px;"
             "overflow-x:auto;font-size:12px}</style></head><body>",
             "<h1>slip-pipeline report</h1>"]
    if baselines:
        rows = [comparison.arm_row(ck, e) for ck, e in [(checkpoint_url, eval_url), *baselines]]
        parts.append(comparison.to_html(rows))

    parts.append("<h2>Dataset</h2>")
    ledger = {k: v for k, v in ds.metrics.items() if not isinstance(v, (dict, list))}
    parts.append(_table([ledger], list(ledger)) if ledger else "<p>(no ledger metrics)</p>")
    reasons = ds.metrics.get("failure_reasons") or ds.metrics.get("reasons")
    if isinstance(reasons, dict) and reasons:
        parts.append("<h3>Recorded fates other than success</h3>")
        parts.append(_table([{"reason": k, "rows": v} for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])],
                            ["reason", "rows"]))

    parts.append("<h2>Pretraining</h2>")
    metrics_path = _find(ck, "metrics.jsonl")
    if metrics_path:
        rows = comparison.read_jsonl(storage.join(artifacts.artifact_root(artifacts.manifest_url(checkpoint_url)), metrics_path))
        if rows:
            parts.append(f"<img alt='loss curve' src='{_png_data_uri(loss_curve(rows))}'>")
    final = {k: v for k, v in ck.metrics.items() if not isinstance(v, (dict, list))}
    if final:
        parts.append(_table([final], list(final)))
    parts.append(train_curve.report_section(checkpoint_url))  # issue 20: the eval curve and the best step

    parts.append("<h2>Evaluation</h2>")
    results_path = _find(ev, "results.json")
    results = []
    if results_path:
        results = json.loads(storage.read_text(storage.join(artifacts.artifact_root(artifacts.manifest_url(eval_url)), results_path)))
    missing = [r for r in results if r.get("value") is None]  # not evaluated: reason recorded
    results = [r for r in results if r.get("value") is not None]
    if results:
        parts.append(f"<img alt='per-dataset results' src='{_png_data_uri(result_bars(results))}'>")
        cols = [c for c in ("dataset", "task", "metric", "value", "chance", "num_samples") if any(c in r for r in results)]
        parts.append(_table(results, cols))
    if missing:
        parts.append("<h3>Not evaluated</h3>" + _table(missing, ["dataset", "task", "reason"]))

    parts.append("<h2>Lineage</h2><pre>" + html.escape(artifacts.format_lineage(eval_url)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
