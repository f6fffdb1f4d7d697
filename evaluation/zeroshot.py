"""Zero-shot classification (SPEC §7, REFERENCE_NOTES §7.1).

Per class: fill every template with every class-name synonym, encode, L2-normalise each row, average,
L2-normalise again. Logits = normalised image embedding · classifierᵀ (no logit scale; the argmax and the
reference's metrics do not depend on it). The classifier is cached per (checkpoint sha256, dataset,
class names + templates), and image embeddings per (checkpoint, dataset files, split, transform).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from datasets import prompts
from evaluation import common, metrics
from slip_core.features import autocast, cache_key, cached_arrays, extract, precision
from slip_core.tokenizer import tokenize


class NotApplicable(ValueError):
    """The task does not apply to this model (e.g. zero-shot on a SimCLR model without a text tower)."""


def require_text_tower(model: torch.nn.Module, task: str = "zero-shot") -> None:
    if not hasattr(model, "encode_text"):
        raise NotApplicable(f"{type(model).__name__} has no text encoder: {task} needs CLIP or SLIP")


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """[len(texts), embed_dim] unit-norm text embeddings (float32, CPU), encoded in batches on the model's
    device (bf16 autocast on CUDA)."""
    ctx, device = model.config.context_length, next(model.parameters()).device
    emb = []
    for i in range(0, len(texts), batch_size):
        with autocast(device):
            out = model.encode_text(tokenize(texts[i:i + batch_size], context_length=ctx).to(device))
        emb.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(emb)


@torch.no_grad()
def text_classifier(model: torch.nn.Module, classnames: list, templates: list[str],
                    batch_size: int = 256) -> torch.Tensor:
    """[num_classes, embed_dim] unit-norm class embeddings (float32, CPU), prompts encoded in batches on the
    model's device (bf16 autocast on CUDA)."""
    require_text_tower(model)
    texts, owner = [], []
    for c, name in enumerate(classnames):
        filled = prompts.fill(templates, name)
        texts += filled
        owner += [c] * len(filled)
    emb = encode_texts(model, texts, batch_size)
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(classnames), emb.shape[1]).index_add_(0, owner_t, emb)
    counts = torch.bincount(owner_t, minlength=len(classnames)).clamp(min=1).unsqueeze(1)
    return F.normalize(sums / counts, dim=-1)


def cached_text_classifier(lm: common.LoadedModel, dataset: str, classnames: list, templates: list[str],
                           cache_dir: str | None = None, batch_size: int = 256,
                           device: torch.device | str = "cpu") -> np.ndarray:
    key = cache_key(ckpt=lm.sha256, dataset=dataset, classnames=classnames, templates=templates,
                    precision=precision(device))
    path = common.cache_root(cache_dir) / "zeroshot" / lm.sha256[:16] / f"{dataset}-{key}.npz"
    return cached_arrays(
        path, lambda: {"w": text_classifier(lm.on(device), classnames, templates, batch_size).numpy()})["w"]


def logits(image_embed: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    x = image_embed / np.linalg.norm(image_embed, axis=1, keepdims=True).clip(min=1e-12)
    return x @ classifier.T


def score(loaded, x: np.ndarray, y: np.ndarray, classifier: np.ndarray) -> dict:
    """The zero-shot record of image embeddings `x` (labels `y`) against a class-embedding classifier."""
    scores = metrics.compute(loaded.entry.metric, logits(x, classifier), y)
    return {"metric": loaded.entry.metric, **scores, "num_samples": int(len(y)), "chance": loaded.entry.chance(),
            "num_templates": len(loaded.templates)}


def evaluate(lm: common.LoadedModel, loaded, batch_size: int = 256, num_workers: int = 0,
             cache_dir: str | None = None, dataset_sha256: str = "", device: torch.device | str = "cpu") -> dict | None:
    """Zero-shot result for one loaded dataset split: {metric, value, top1[, top5], num_samples, chance}.
    Under torchrun the image features are extracted across ranks; rank 0 scores, the others return None."""
    require_text_tower(lm.model)
    x, y = common.features(lm, loaded, "embed", batch_size, num_workers, cache_dir, dataset_sha256, device)
    if x is None:
        return None
    classifier = cached_text_classifier(lm, loaded.name, loaded.classnames, loaded.templates, cache_dir, device=device)
    return score(loaded, x, y, classifier)


def evaluate_model(model: torch.nn.Module, loaded, batch_size: int = 256, num_workers: int = 0,
                   device: torch.device | str = "cpu") -> dict | None:
    """`evaluate` for a model in memory (in-training evaluation, evaluation/in_training.py): the same
    extraction, classifier and scoring, nothing cached (the weights change between calls). The model must be
    on `device`; under torchrun rank 0 returns the record, the others None."""
    require_text_tower(model)
    x, y = extract(model.encode_image, loaded.dataset, batch_size, num_workers, device)
    if x is None:
        return None
    return score(loaded, x, y, text_classifier(model, loaded.classnames, loaded.templates, batch_size).numpy())
