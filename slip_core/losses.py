"""CLIP, SimCLR (NT-Xent) and SLIP losses with the reference semantics under torch.distributed (SPEC §4, §9.3-4).

Notation: B local batch, W world size, N = B·W, r rank; row i's positive is label_i = r·B + i.
Every loss returns a dict: `loss` (differentiable) and detached metrics (accuracies in percent over the
local batch). All work with or without an initialised process group. A leaf module: which loss a model kind
trains with is its TrainSpec's `build_loss` (slip_core/train_spec.py; build through slip_core/registry.py).

Gradient accumulation (k micro-batches per optimizer step) is NOT the same as one k× larger batch for any of
these losses: InfoNCE / NT-Xent normalise each row over the negatives of its own (gathered) micro-batch, so
k micro-batches of B see B·W − 1 negatives each instead of k·B·W − 1. What accumulation does equal is the mean
of the per-micro-batch losses computed in one pass (tests/test_trainer.py checks this to fp64 precision, and
that the full-batch loss differs); the SimCLR head's BatchNorm adds micro-batch statistics on top (SPEC §6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slip_core.distributed import all_gather_no_grad, all_gather_with_grad, get_rank

# Subtracted from self-similarity logits; an fp32 constant (in fp16 1e9 would overflow to inf, SPEC §9.4).
LARGE_NUM = 1e9


@dataclass(frozen=True)
class LossOptions:
    """The loss settings of a training config (TrainConfig's ssl_scale, ssl_temp, clip_gather_with_grad)."""
    ssl_scale: float = 1.0
    ssl_temp: float = 0.1
    clip_gather_with_grad: bool = False


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 for the similarity math; fp32/fp64 are kept (fp64 is used by exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def positive_labels(batch: int, device: torch.device) -> torch.Tensor:
    return batch * get_rank() + torch.arange(batch, device=device)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean().detach() * 100.0


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE over the global batch.

    Default (reference): features of all ranks are gathered WITHOUT gradient, so with W > 1 each rank's
    gradient flows only through its own query rows (issues #24/#31). `gather_with_grad=True` gathers with
    gradient, so the DDP-averaged gradient equals the full-batch gradient (SPEC §9.3).
    """

    def __init__(self, gather_with_grad: bool = False):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = F.normalize(upcast(outputs["image_embed"]), dim=-1)
        text = F.normalize(upcast(outputs["text_embed"]), dim=-1)
        scale = upcast(outputs["logit_scale"])
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        image_all, text_all = gather(image), gather(text)
        labels = positive_labels(image.shape[0], image.device)
        logits_per_image = scale * image @ text_all.t()
        logits_per_text = scale * text @ image_all.t()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, "clip_loss": loss.detach(), "clip_acc": accuracy(logits_per_image, labels)}


class SIMCLRLoss(nn.Module):
    """NT-Xent with temperature τ; both views gathered WITH gradient; self-pairs masked (SPEC §4)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.tau = temperature

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q_a = F.normalize(upcast(outputs["aug1_embed"]), dim=-1)
        q_b = F.normalize(upcast(outputs["aug2_embed"]), dim=-1)
        k_a, k_b = all_gather_with_grad(q_a), all_gather_with_grad(q_b)
        labels = positive_labels(q_a.shape[0], q_a.device)
        # fp32 (or fp64) mask: under autocast the logits may be fp16/bf16 and the subtraction promotes
        mask = F.one_hot(labels, k_a.shape[0]).to(torch.promote_types(q_a.dtype, torch.float32)) * LARGE_NUM
        logits_aa = q_a @ k_a.t() / self.tau - mask
        logits_bb = q_b @ k_b.t() / self.tau - mask
        logits_ab = q_a @ k_b.t() / self.tau
        logits_ba = q_b @ k_a.t() / self.tau
        logits_a = torch.cat([logits_ab, logits_aa], dim=1)
        loss_a = F.cross_entropy(logits_a, labels)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
        loss = (loss_a + loss_b) / 2
        return {"loss": loss, "ssl_loss": loss.detach(), "ssl_acc": accuracy(logits_a, labels)}


class SLIPLoss(nn.Module):
    """clip_loss + ssl_scale · ssl_loss."""

    def __init__(self, ssl_scale: float = 1.0, ssl_temp: float = 0.1, clip_gather_with_grad: bool = False):
        super().__init__()
        self.ssl_scale = ssl_scale
        self.clip = CLIPLoss(clip_gather_with_grad)
        self.ssl = SIMCLRLoss(ssl_temp)

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clip, ssl = self.clip(outputs), self.ssl(outputs)
        return {"loss": clip["loss"] + self.ssl_scale * ssl["loss"],
                "clip_loss": clip["clip_loss"], "clip_acc": clip["clip_acc"],
                "ssl_loss": ssl["ssl_loss"], "ssl_acc": ssl["ssl_acc"]}


def build_clip_loss(opts: LossOptions) -> CLIPLoss:
    return CLIPLoss(opts.clip_gather_with_grad)


def build_simclr_loss(opts: LossOptions) -> SIMCLRLoss:
    return SIMCLRLoss(opts.ssl_temp)


def build_slip_loss(opts: LossOptions) -> SLIPLoss:
    return SLIPLoss(opts.ssl_scale, opts.ssl_temp, opts.clip_gather_with_grad)
