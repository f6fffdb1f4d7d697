"""SLIP with other self-supervised objectives (paper Table 6): models, losses and presets, registered as
train specs (slip_core/train_spec.py) when this module is imported.

Every variant keeps SLIP's CLIP branch (text tower, `image_projection`, CLIP loss) unchanged and the SLIP
call signature `forward(image, text, aug1, aug2)`, so the trainer, loader (`image`, `aug1`, `aug2` views of
SPEC §5) and evaluation treat them exactly like SLIP. Only the SSL branch differs:

* **SLIP-MoCo v3** (`slip_mocov3`): online ViT → projector (3-layer MLP, BN, last BN without affine) →
  predictor (2-layer MLP, same rules); momentum (EMA) copy of ViT + projector gives the keys; loss
  ctr(q1, k2) + ctr(q2, k1) with ctr(q, k) = 2τ · CE(q·gather(k)ᵀ/τ, labels), keys gathered across ranks
  without gradient. Numbers are the MoCo v3 paper's / repository's ViT defaults (Chen, Xie & He 2021:
  τ = 0.2, m = 0.99 raised to 1 by a half-cosine, MLP 4096, output 256, bias-free Linear layers); the
  SLIP notes do not give Table 6's hyper-parameters. MoCo v3's frozen random patch projection is NOT
  used: the ViT is shared with the CLIP branch, which trains it.
* **SLIP-BYOL** (`slip_byol`): online ViT → projector (Linear-BN-ReLU-Linear, 4096 → 256) → predictor
  (same shape); EMA target ViT + projector; loss (2 − 2cos(p1, z2')) + (2 − 2cos(p2, z1')), batch means,
  summed over the two directions as in the BYOL paper (Grill et al. 2020: τ_base = 0.996 raised to 1 by
  a half-cosine). Nothing is gathered across ranks except SyncBatchNorm statistics.
* **SLIP-BEiT** (`slip_beit`): see slip_core/mim.py.
* **CLIP_RN50**: CLIP's modified ResNet-50 with attention pooling (open_clip's `ModifiedResNet`, not
  hand-written; dims of open_clip's RN50 config: layers (3, 4, 6, 3), width 64, embed 1024), our text
  tower, kind "clip" so it trains with SLIP's improved CLIP view (SPEC §5) — see slip_core/resnet_clip.py.

EMA: the spec's `after_step` calls `model.after_optimizer_step(progress)` after every optimizer step, progress =
step / total_steps of the step just taken; the target then moves to m·target + (1 − m)·online with
m = 1 − (1 − m₀)·(cos(π·progress) + 1)/2. Target networks are registered submodules without gradient, so
they are in the state dict (checkpoints and resume restore them exactly) but not in the optimizer; their
BatchNorm layers keep their own batch statistics (as MoCo v3's momentum encoder).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from slip_core.distributed import SyncBatchNorm, all_gather_no_grad
from slip_core.losses import CLIPLoss, LossOptions, accuracy, positive_labels, upcast
from slip_core.models import CLIP, ModelConfig, vit_presets
from slip_core.train_spec import SLIP_SPEC, clamp_logit_scale, register_train_spec

MOCO_V3_TEMPERATURE = 0.2  # MoCo v3 ViT recipe (--moco-t=.2)

# ------------------------------------------------------------------------------------------- pieces
def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL schedule: base at progress 0, 1 at progress 1, half-cosine in between."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, *, bias: bool, last_bn: bool) -> nn.Sequential:
    """MoCo v3's `_build_mlp` (Linear → BN → ReLU per hidden layer; optional affine-free BN at the end),
    with our SyncBatchNorm so statistics span the global batch on any backend (slip_core.distributed)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(num_layers):
        d1 = in_dim if i == 0 else mlp_dim
        d2 = out_dim if i == num_layers - 1 else mlp_dim
        layers[f"layer{i + 1}"] = nn.Linear(d1, d2, bias=bias)
        if i < num_layers - 1:
            layers[f"bn{i + 1}"] = SyncBatchNorm(d2)
            layers[f"relu{i + 1}"] = nn.ReLU(inplace=True)
        elif last_bn:
            layers[f"bn{i + 1}"] = SyncBatchNorm(d2, affine=False)
    return nn.Sequential(layers)


class SLIPWithTarget(CLIP):
    """SLIP whose SSL branch is online (ViT → `image_mlp` → `image_predictor`) vs an EMA target
    (`target_visual` → `target_mlp`). Subclasses fix the MLP shapes; the losses below the objective."""

    projector_layers, predictor_layers, mlp_bias, last_bn = 3, 2, False, True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if not 0.0 <= cfg.ema_momentum < 1.0:
            raise ValueError(f"{cfg.name}: ema_momentum must be in [0, 1), got {cfg.ema_momentum}")
        kw = dict(bias=self.mlp_bias, last_bn=self.last_bn)
        self.image_mlp = build_mlp(self.projector_layers, cfg.vision_width, cfg.ssl_mlp_dim, cfg.ssl_emb_dim, **kw)
        self.image_predictor = build_mlp(self.predictor_layers, cfg.ssl_emb_dim, cfg.ssl_mlp_dim, cfg.ssl_emb_dim, **kw)
        # the target starts as an exact copy of the online network (MoCo v3, BYOL)
        self.target_visual = copy.deepcopy(self.visual).requires_grad_(False)
        self.target_mlp = copy.deepcopy(self.image_mlp).requires_grad_(False)
        self.register_buffer("ema_last_momentum", torch.tensor(-1.0, dtype=torch.float64))  # -1: never updated

    def _pairs(self):
        return ((self.visual, self.target_visual), (self.image_mlp, self.target_mlp))

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """target ← m·target + (1 − m)·online, parameters only (BN running stats are the target's own)."""
        for online, target in self._pairs():
            t = list(target.parameters())
            o = [p.detach() for p in online.parameters()]
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, o, alpha=1.0 - momentum)
        self.ema_last_momentum.fill_(momentum)

    def after_optimizer_step(self, progress: float) -> float:
        """Called by the trainer after each optimizer step; returns the momentum used."""
        m = cosine_momentum(self.config.ema_momentum, progress)
        self.ema_update(m)
        return m

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor,
                aug2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image, text)
        out["aug1_embed"] = self.image_predictor(self.image_mlp(self.visual(aug1)))
        out["aug2_embed"] = self.image_predictor(self.image_mlp(self.visual(aug2)))
        with torch.no_grad():
            out["aug1_target"] = self.target_mlp(self.target_visual(aug1))
            out["aug2_target"] = self.target_mlp(self.target_visual(aug2))
        return out


class SLIPMoCoV3(SLIPWithTarget):
    projector_layers, predictor_layers, mlp_bias, last_bn = 3, 2, False, True  # MoCo_ViT


class SLIPBYOL(SLIPWithTarget):
    projector_layers, predictor_layers, mlp_bias, last_bn = 2, 2, True, False  # BYOL's MLPs


# ------------------------------------------------------------------------------------------- losses
class MoCoV3Loss(nn.Module):
    """ctr(q1, k2) + ctr(q2, k1); ctr(q, k) = CE(q·kᵀ_all / τ, r·B + arange(B)) · 2τ (MoCo v3).
    Keys are constants gathered from all ranks (concat_all_gather); queries are the local rows."""

    def __init__(self, temperature: float = MOCO_V3_TEMPERATURE):
        super().__init__()
        self.tau = temperature

    def _ctr(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(upcast(q), dim=-1)
        k = all_gather_no_grad(F.normalize(upcast(k.detach()), dim=-1))
        logits = q @ k.t() / self.tau
        labels = positive_labels(q.shape[0], q.device)
        return F.cross_entropy(logits, labels) * (2 * self.tau), accuracy(logits, labels)

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        l12, acc = self._ctr(outputs["aug1_embed"], outputs["aug2_target"])
        l21, _ = self._ctr(outputs["aug2_embed"], outputs["aug1_target"])
        loss = l12 + l21
        return {"loss": loss, "ssl_loss": loss.detach(), "ssl_acc": acc}


class BYOLLoss(nn.Module):
    """(2 − 2cos(p1, z2')) + (2 − 2cos(p2, z1')), each averaged over the local batch (BYOL)."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def nmse(p, z):
            return (2 - 2 * F.cosine_similarity(upcast(p), upcast(z.detach()), dim=-1)).mean()

        loss = nmse(outputs["aug1_embed"], outputs["aug2_target"]) + nmse(outputs["aug2_embed"], outputs["aug1_target"])
        return {"loss": loss, "ssl_loss": loss.detach()}


class SLIPVariantLoss(nn.Module):
    """clip_loss + ssl_scale · (variant SSL loss), with SLIP's metric keys."""

    def __init__(self, ssl: nn.Module, ssl_scale: float = 1.0, clip_gather_with_grad: bool = False):
        super().__init__()
        self.ssl_scale, self.ssl = ssl_scale, ssl
        self.clip = CLIPLoss(clip_gather_with_grad)

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clip, ssl = self.clip(outputs), self.ssl(outputs)
        out = {"loss": clip["loss"] + self.ssl_scale * ssl["loss"], "clip_loss": clip["clip_loss"],
               "clip_acc": clip["clip_acc"]}
        out.update({k: v for k, v in ssl.items() if k != "loss"})
        return out


# ------------------------------------------------------------------------------------------- specs
def ema_after_step(model: SLIPWithTarget, progress: float) -> None:
    """Logit-scale clamp, then the EMA target update with the cosine momentum at `progress`."""
    clamp_logit_scale(model, progress)
    model.after_optimizer_step(progress)


def build_mocov3_loss(opts: LossOptions, moco_temp: float = MOCO_V3_TEMPERATURE) -> SLIPVariantLoss:
    """SimCLR's `ssl_temp` does not apply; MoCo v3's temperature is `moco_temp`."""
    return SLIPVariantLoss(MoCoV3Loss(moco_temp), opts.ssl_scale, opts.clip_gather_with_grad)


def build_byol_loss(opts: LossOptions) -> SLIPVariantLoss:
    return SLIPVariantLoss(BYOLLoss(), opts.ssl_scale, opts.clip_gather_with_grad)


# ViT-B/16 uses the MoCo v3 / BYOL papers' defaults (the SLIP notes give none for Table 6): EMA momentum
# 0.99 / 0.996. Every variant keeps SLIP's views, inputs and recipe (lr, wd).
for _kind, _model, _loss, _momentum in (("slip_mocov3", SLIPMoCoV3, build_mocov3_loss, 0.99),
                                         ("slip_byol", SLIPBYOL, build_byol_loss, 0.996)):
    register_train_spec(dataclasses.replace(
        SLIP_SPEC, kind=_kind, build_model=_model, build_loss=_loss, after_step=ema_after_step, ema_target_views=2,
        presets=vit_presets(_kind, _kind.upper(), {"ema_momentum": _momentum}, {"ema_momentum": _momentum},
                            backbones=("VITB16",))))
