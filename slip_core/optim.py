"""Reference optimiser pieces (SPEC §6, §9.5): AdamW parameter groups and the per-iteration lr schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# The per-kind reference lr / wd (SPEC §6) are part of each TrainSpec (slip_core/train_spec.py).
NO_DECAY_KEYS = ("bias", "ln", "bn")
LOGIT_SCALE_MAX = math.log(100.0)  # 4.6052: clamp after every optimizer step


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups by the reference rule: decay iff ndim >= 2 and the name has none of bias/ln/bn.

    By that rule ViT cls_token/pos_embed and the text embeddings ARE decayed (SPEC §9.5), while
    logit_scale (0-dim), biases and every LayerNorm/BatchNorm affine are not.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-8):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          start_lr: float = 1e-6, end_lr: float = 1e-5) -> float:
    """lr for optimizer step `step` (0-based): linear warmup from start_lr to base_lr over `warmup_steps`
    (endpoints included, like numpy.linspace), then cosine from base_lr to end_lr over the rest."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_lr
        return start_lr + (base_lr - start_lr) * step / (warmup_steps - 1)
    k, K = step - warmup_steps, max(1, total_steps - warmup_steps)
    return end_lr + 0.5 * (base_lr - end_lr) * (1 + math.cos(math.pi * min(k, K) / K))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
