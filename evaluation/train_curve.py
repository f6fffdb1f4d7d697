"""The in-training evaluation curve of a checkpoint artifact, for reports (evaluation/pipeline_report.py).

Reads only the artifact's metrics.jsonl and loss_curve.png (drawn by slip_core.launch.plot_loss_curve with the
evaluation on its second axis); imports no torch, so building a report stays cheap.
"""
from __future__ import annotations

import base64
import html
import json

from slip_core import artifacts, storage
from slip_core.launch import EVAL_METRIC, best_eval


def summary(recs: list[dict]) -> str | None:
    """One line on a run's in-training evaluation (from its metrics.jsonl records): best step and value, the
    final one, and the cost per evaluation; None when no evaluation ran."""
    evals = [r for r in recs if EVAL_METRIC in r]
    best = best_eval(recs)
    if best is None:
        return None
    metric, last = best[EVAL_METRIC], evals[-1]
    name = "zero-shot" if metric == "zeroshot_top1" else "k-NN (no text tower)"
    secs = sum(r["eval_seconds"] for r in evals) / len(evals)
    return (f"best step {best['step']}, {name} {best[metric]:.1f}% ({metric} on {best['eval_dataset']}, "
            f"{best['eval_samples']} images); final step {last['step']}: {last[metric]:.1f}%; "
            f"{len(evals)} evaluations, {secs:.2f} s each on average")


def report_section(checkpoint_url: str) -> str:
    """HTML for the pipeline report: the summary line and the checkpoint artifact's loss_curve.png (the
    in-training evaluation on its second axis, best step starred); "" when the run had no evaluation."""
    murl = artifacts.manifest_url(checkpoint_url)
    root, files = artifacts.artifact_root(murl), {f.path for f in artifacts.load_manifest(murl).files}
    if "metrics.jsonl" not in files:
        return ""
    recs = [json.loads(line) for line in storage.read_text(storage.join(root, "metrics.jsonl")).splitlines()
            if line.strip()]
    line = summary(recs)
    if line is None:
        return ""
    parts = ["<h3>Evaluation during training</h3>", f"<p>{html.escape(line)}</p>"]
    if "loss_curve.png" in files:
        png = base64.b64encode(storage.read_bytes(storage.join(root, "loss_curve.png"))).decode()
        parts.append(f"<img alt='loss and in-training evaluation' src='data:image/png;base64,{png}'>")
    return "\n".join(parts)
