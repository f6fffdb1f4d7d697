"""Classification metrics as the reference computes them (SPEC §7), all reported x100.

top1 | mean_per_class (aircraft, pets, caltech101, flowers) | roc_auc (hateful_memes, score = logit[1] - logit[0])
| top1_top5_mean (kinetics700_frames).
"""
from __future__ import annotations

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return 100.0 * float(np.mean((topk == labels[:, None]).any(axis=1)))


def mean_per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Mean over the classes present in `labels` of each class's top-1 recall."""
    pred = logits.argmax(axis=1)
    classes = np.unique(labels) if num_classes is None else [c for c in range(num_classes) if (labels == c).any()]
    return 100.0 * float(np.mean([(pred[labels == c] == c).mean() for c in classes]))


def roc_auc(logits: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if logits.shape[1] != 2:
        raise ValueError("roc_auc needs 2-class logits")
    return 100.0 * float(roc_auc_score(labels, logits[:, 1] - logits[:, 0]))


def compute(metric: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"value": the dataset's metric, plus top1 (top5 where it exists) and mean_per_class for context}."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    out["mean_per_class"] = mean_per_class_accuracy(logits, labels, logits.shape[1])
    if metric == "top1":
        out["value"] = out["top1"]
    elif metric == "mean_per_class":
        out["value"] = out["mean_per_class"]
    elif metric == "roc_auc":
        out["value"] = roc_auc(logits, labels)
    elif metric == "top1_top5_mean":
        out["value"] = (out["top1"] + out.get("top5", 100.0)) / 2
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return out
