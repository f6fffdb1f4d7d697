"""Evaluation report: Markdown (for Prefect artifacts / reading in a terminal) and a self-contained HTML page
with plots (per-dataset bars against chance, per task) and the paper-vs-ours table (SPEC §8) for the rows
whose configuration matches (same model preset, pretraining data and epochs when known; ImageNet).
"""
from __future__ import annotations

import base64
import html
import io

# SPEC §8: ImageNet-1K top-1 (zero-shot, linear, fine-tune) by (model preset, pretraining set, epochs).
PAPER_IMAGENET: dict[tuple[str, str, int], dict[str, float | None]] = {
    ("CLIP_VITS16", "yfcc15m", 25): {"zeroshot": 32.7, "linear": 59.3, "finetune": 78.2},
    ("SIMCLR_VITS16", "yfcc15m", 25): {"zeroshot": None, "linear": 58.1, "finetune": 79.9},
    ("SLIP_VITS16", "yfcc15m", 25): {"zeroshot": 38.3, "linear": 66.4, "finetune": 80.3},
    ("SLIP_VITS16", "yfcc15m", 50): {"zeroshot": 39.3, "linear": 67.6, "finetune": 80.7},
    ("SLIP_VITS16", "yfcc15m", 100): {"zeroshot": 39.5, "linear": 68.3, "finetune": 80.7},
    ("CLIP_VITB16", "yfcc15m", 25): {"zeroshot": 37.6, "linear": 66.5, "finetune": 80.5},
    ("SIMCLR_VITB16", "yfcc15m", 25): {"zeroshot": None, "linear": 64.0, "finetune": 82.5},
    ("SLIP_VITB16", "yfcc15m", 25): {"zeroshot": 42.8, "linear": 72.1, "finetune": 82.6},
    ("SLIP_VITB16", "yfcc15m", 50): {"zeroshot": 44.1, "linear": 73.0, "finetune": 82.9},
    ("SLIP_VITB16", "yfcc15m", 100): {"zeroshot": 45.0, "linear": 73.6, "finetune": 83.4},
    ("CLIP_VITL16", "yfcc15m", 25): {"zeroshot": 40.4, "linear": 70.5, "finetune": 81.0},
    ("SIMCLR_VITL16", "yfcc15m", 25): {"zeroshot": None, "linear": 66.7, "finetune": 84.0},
    ("SLIP_VITL16", "yfcc15m", 25): {"zeroshot": 46.2, "linear": 76.0, "finetune": 84.2},
    ("SLIP_VITL16", "yfcc15m", 50): {"zeroshot": 47.4, "linear": 75.8, "finetune": 84.7},
    ("SLIP_VITL16", "yfcc15m", 100): {"zeroshot": 47.9, "linear": 75.1, "finetune": 84.8},
    ("CLIP_VITB16", "cc3m", 40): {"zeroshot": 17.1, "linear": 53.3, "finetune": 79.5},
    ("SLIP_VITB16", "cc3m", 40): {"zeroshot": 23.0, "linear": 65.4, "finetune": 81.4},
    ("CLIP_VITB16", "cc12m", 35): {"zeroshot": 36.5, "linear": 69.0, "finetune": 82.1},
    ("SLIP_VITB16", "cc12m", 35): {"zeroshot": 40.7, "linear": 73.7, "finetune": 83.1},
}


def paper_rows(results: list[dict], pretrain: dict | None = None) -> list[dict]:
    """Paper-vs-ours rows for ImageNet results whose model (and pretraining set/epochs, when known) match."""
    pretrain = pretrain or {}
    rows = []
    for r in results:
        if r.get("dataset") != "imagenet" or r.get("value") is None:
            continue
        for (model, data, epochs), nums in PAPER_IMAGENET.items():
            if model != r.get("model") or nums.get(r["task"]) is None:
                continue
            if pretrain.get("dataset") and pretrain["dataset"] != data:
                continue
            if pretrain.get("epochs") and int(pretrain["epochs"]) != epochs:
                continue
            rows.append({"model": model, "pretrain": data, "epochs": epochs, "task": r["task"],
                         "paper": nums[r["task"]], "ours": round(float(r["value"]), 2),
                         "delta": round(float(r["value"]) - nums[r["task"]], 2)})
    return rows


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


RESULT_COLS = ["task", "dataset", "metric", "value", "chance", "num_samples", "model"]
PAPER_COLS = ["model", "pretrain", "epochs", "task", "paper", "ours", "delta"]


def to_markdown(results: list[dict], title: str = "Evaluation", pretrain: dict | None = None,
                lineage: str = "") -> str:
    ok = [r for r in results if r.get("value") is not None]
    failed = [r for r in results if r.get("value") is None]
    parts = [f"# {title}", ""]
    if ok:
        sha = ok[0].get("checkpoint_sha256", "")
        parts += [f"Checkpoint `{ok[0].get('model', '')}` sha256 `{sha[:16]}`; values x100; chance = a random guesser.",
                  "", markdown_table(ok, RESULT_COLS), ""]
    rows = paper_rows(ok, pretrain)
    parts += ["## Paper vs ours (ImageNet-1K, SPEC §8)", "",
              markdown_table(rows, PAPER_COLS) if rows else
              "_No result matches a paper configuration (needs a paper model preset evaluated on imagenet)._", ""]
    if failed:
        parts += ["## Not evaluated", "", markdown_table(failed, ["task", "dataset", "reason"]), ""]
    if lineage:
        parts += ["## Lineage", "", "```", lineage, "```", ""]
    return "\n".join(parts)


def bar_figure(results: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(5.0, 0.5 * max(len([r for r in results if r["task"] == t])
                                                                         for t in tasks) + 2), 2.8 * len(tasks)),
                             squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        rows = [r for r in results if r["task"] == task]
        ax.bar(range(len(rows)), [float(r["value"]) for r in rows], color="#4c72b0")
        for i, r in enumerate(rows):
            if r.get("chance") is not None:
                ax.hlines(float(r["chance"]), i - 0.4, i + 0.4, colors="red", linestyles="dashed")
        ax.set_xticks(range(len(rows)), [r["dataset"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{task} ({', '.join(sorted({r['metric'] for r in rows}))}; red: chance)", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html_table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(results: list[dict], title: str = "Evaluation", pretrain: dict | None = None, lineage: str = "",
            png: bytes | None = None) -> str:
    ok = [r for r in results if r.get("value") is not None]
    if png is None and ok:
        png = figure_png(bar_figure(ok))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    if png:
        parts.append(f"<img alt='per-dataset results' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append(_html_table(ok, RESULT_COLS))
    rows = paper_rows(ok, pretrain)
    parts.append("<h2>Paper vs ours (ImageNet-1K, SPEC §8)</h2>")
    parts.append(_html_table(rows, PAPER_COLS) if rows else "<p>No result matches a paper configuration.</p>")
    failed = [r for r in results if r.get("value") is None]
    if failed:
        parts += ["<h2>Not evaluated</h2>", _html_table(failed, ["task", "dataset", "reason"])]
    if lineage:
        parts.append(f"<h2>Lineage</h2><pre>{html.escape(lineage)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
