"""k-NN classification on frozen image features: the in-training metric of models without a text tower.

SimCLR has no text encoder, so zero-shot top-1 does not exist for it (the reference records -1 and never keeps
a best checkpoint, REFERENCE_NOTES §6.5). To keep a best checkpoint by the same held-out set, we score the
pooled ViT features with a weighted k-NN classifier (Wu et al. 2018 / DINO: cosine similarity, the k nearest
train features vote with weight exp(sim / T), k = 20, T = 0.07), the train split being the bank. The metric is
named `knn_top1` wherever it is recorded, never `zeroshot_top1`.
"""
from __future__ import annotations

import numpy as np
import torch

from evaluation import metrics
from slip_core.features import extract

K, TEMPERATURE = 20, 0.07


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def knn_logits(bank_x: np.ndarray, bank_y: np.ndarray, x: np.ndarray, num_classes: int, k: int = K,
               temperature: float = TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """[len(x), num_classes] class votes of the k nearest bank rows (cosine), weighted by exp(sim / T);
    computed `chunk` query rows at a time (memory: chunk × len(bank))."""
    bank, k = _unit(bank_x.astype(np.float32)), min(k, len(bank_x))
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    for i in range(0, len(x), chunk):
        sim = _unit(x[i:i + chunk].astype(np.float32)) @ bank.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
        weights = np.exp(nn_sim / temperature)
        rows = np.repeat(np.arange(len(nn_idx)), k)
        np.add.at(out[i:i + chunk], (rows, bank_y[nn_idx].ravel()), weights.ravel())
    return out


def evaluate_model(model: torch.nn.Module, bank, loaded, batch_size: int = 256, num_workers: int = 0,
                   device: torch.device | str = "cpu") -> dict | None:
    """k-NN top-1 of `loaded` (a catalog split) against the train-split bank `bank`, on the model's pooled ViT
    features (the linear probe's); under torchrun both are extracted across ranks, rank 0 returns the record."""
    bank_x, bank_y = extract(model.visual, bank.dataset, batch_size, num_workers, device)
    x, y = extract(model.visual, loaded.dataset, batch_size, num_workers, device)
    if x is None:
        return None
    top1 = metrics.topk_accuracy(knn_logits(bank_x, bank_y, x, loaded.entry.num_classes), y, 1)
    return {"metric": "knn_top1", "value": top1, "top1": top1, "num_samples": int(len(y)),
            "num_bank": int(len(bank_y)), "k": K, "chance": loaded.entry.chance()}
