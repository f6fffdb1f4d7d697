"""CLIP, SimCLR (NT-Xent) and SLIP losses with the reference semantics under torch.distributed (SPEC §4, §9.3-4).

Notation: B local batch, W world size, N = B·W, r rank; row i's positive is label_i = r·B + i.
Every loss returns a dict: `loss` (differentiable) and detached metrics (accuracies in percent over the
local batch). All work with or without an initialised process group.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slip_core.distributed import all_gather_no_grad, all_gather_with_grad, get_rank

# Subtracted from self-similarity logits; an fp32 constant (in fp16 1e9 would overflow to inf, SPEC §9.4).
LARGE_NUM = 1e9


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 for the similarity math; fp32/fp64 are kept (fp64 is used by exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _labels(batch: int, device: torch.device) -> torch.Tensor:
    return batch * get_rank() + torch.arange(batch, device=device)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
        image = F.normalize(_upcast(outputs["image_embed"]), dim=-1)
        text = F.normalize(_upcast(outputs["text_embed"]), dim=-1)
        scale = _upcast(outputs["logit_scale"])
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        image_all, text_all = gather(image), gather(text)
        labels = _labels(image.shape[0], image.device)
        logits_per_image = scale * image @ text_all.t()
        logits_per_text = scale * text @ image_all.t()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, "clip_loss": loss.detach(), "clip_acc": _accuracy(logits_per_image, labels)}


class SIMCLRLoss(nn.Module):
    """NT-Xent with temperature τ; both views gathered WITH gradient; self-pairs masked (SPEC §4)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.tau = temperature

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q_a = F.normalize(_upcast(outputs["aug1_embed"]), dim=-1)
        q_b = F.normalize(_upcast(outputs["aug2_embed"]), dim=-1)
        k_a, k_b = all_gather_with_grad(q_a), all_gather_with_grad(q_b)
        labels = _labels(q_a.shape[0], q_a.device)
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
        return {"loss": loss, "ssl_loss": loss.detach(), "ssl_acc": _accuracy(logits_a, labels)}


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


def _kind(model_name_or_kind: str) -> str:
    key = model_name_or_kind.lower()
    for kind in ("simclr", "slip", "clip"):  # "simclr" before "clip"/"slip": neither is its prefix, but be explicit
        if key == kind or key.startswith(kind + "_"):
            return kind
    raise ValueError(f"cannot tell the loss for model {model_name_or_kind!r}; expected clip/simclr/slip or a preset name")


def build_loss(model_name_or_kind: str, ssl_scale: float = 1.0, ssl_temp: float = 0.1,
               clip_gather_with_grad: bool = False, **variant_kwargs) -> nn.Module:
    """Loss module for a model preset name ("SLIP_VITB16") or kind ("slip" | "clip" | "simclr", or a SLIP
    variant "slip_mocov3" | "slip_byol" | "slip_beit", whose losses live in slip_core/ssl_variants.py;
    `variant_kwargs` go to those, e.g. moco_temp)."""
    from slip_core import ssl_variants  # imports models, which this module must not import at load time

    variant = ssl_variants.variant_kind(model_name_or_kind)
    if variant:
        return ssl_variants.build_variant_loss(variant, ssl_scale, clip_gather_with_grad, **variant_kwargs)
    if variant_kwargs:
        raise TypeError(f"unexpected arguments {sorted(variant_kwargs)} for {model_name_or_kind!r}")
    kind = _kind(model_name_or_kind)
    if kind == "clip":
        return CLIPLoss(clip_gather_with_grad)
    if kind == "simclr":
        return SIMCLRLoss(ssl_temp)
    return SLIPLoss(ssl_scale, ssl_temp, clip_gather_with_grad)
