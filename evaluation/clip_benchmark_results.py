"""Our eval records in CLIP_benchmark's JSON result format, one file per (dataset, task), so that
`clip_benchmark build FILES_OR_DIRS --output benchmark.csv` tables them next to open_clip models.

CLIP_benchmark writes {"dataset", "model", "pretrained", "task", "metrics", "language"} per evaluation, named
"{dataset}_{pretrained}_{model}_{language}_{task}.json", metrics as fractions (not x100):
zeroshot_classification {acc1, acc5, mean_per_class_recall}, linear_probe {lp_acc1, lp_acc5,
lp_mean_per_class_recall}, zeroshot_retrieval {image_retrieval_recall@k (text -> image), text_retrieval_recall@k
(image -> text)}. acc5 is NaN where the dataset has too few classes for a top-5, as CLIP_benchmark writes it.
Datasets take CLIP_benchmark's names where it has the set (imagenet -> imagenet1k, aircraft -> fgvc_aircraft).
"""
from __future__ import annotations

import json
import math

from datasets.prompts import CLIP_BENCHMARK_KEYS
from slip_core import storage

DATASET_NAMES = {**CLIP_BENCHMARK_KEYS, "imagenet": "imagenet1k", "coco": "mscoco_captions", "flickr30k": "flickr30k"}
TASKS = {"zeroshot": "zeroshot_classification", "linear": "linear_probe", "retrieval": "zeroshot_retrieval",
         "finetune": "finetune"}


def _fraction(record: dict, key: str) -> float:
    v = record.get(key)
    return float(v) / 100.0 if v is not None else math.nan


def _metrics(record: dict) -> dict:
    task = record["task"]
    if task == "retrieval":
        ks = sorted({int(k.rsplit("@", 1)[1]) for k in record if k.startswith("text_to_image_R@")})
        return {**{f"image_retrieval_recall@{k}": _fraction(record, f"text_to_image_R@{k}") for k in ks},
                **{f"text_retrieval_recall@{k}": _fraction(record, f"image_to_text_R@{k}") for k in ks}}
    prefix = "lp_" if task == "linear" else ""
    return {f"{prefix}acc1": _fraction(record, "top1"), f"{prefix}acc5": _fraction(record, "top5"),
            f"{prefix}mean_per_class_recall": _fraction(record, "mean_per_class")}


def to_clip_benchmark(record: dict, pretrained: str | None = None) -> dict:
    """One record (results.json row with a value) as a CLIP_benchmark result dict."""
    if record.get("value") is None:
        raise ValueError(f"{record.get('task')}/{record.get('dataset')} has no value: {record.get('reason', '')}")
    return {"dataset": DATASET_NAMES.get(record["dataset"], record["dataset"]), "model": record["model"],
            "pretrained": pretrained or record.get("checkpoint_sha256", "")[:16] or "unknown",
            "task": TASKS[record["task"]], "metrics": _metrics(record), "language": "en"}


def write(records: list[dict], out_dir: str, pretrained: str | None = None) -> list[str]:
    """One JSON file per record with a value (records without one are skipped); returns the paths."""
    paths = []
    for r in records:
        if r.get("value") is None:
            continue
        d = to_clip_benchmark(r, pretrained)
        name = f"{d['dataset']}_{d['pretrained']}_{d['model']}_{d['language']}_{d['task']}.json".replace("/", "-")
        path = storage.join(out_dir, name)
        storage.atomic_write_text(path, json.dumps(d))  # NaN as CLIP_benchmark's json.dump writes it
        paths.append(path)
    return paths
