"""Train specs: one declaration per kind of model, in the manner of torchtitan's TrainSpec.

A TrainSpec says everything the trainer, the loader and the cost model need to know about one kind of model,
so that none of them tests `kind` strings:

* `build_model(ModelConfig)` and `build_loss(LossOptions, **variant_options)`;
* `views`: the augmented views the loader produces for it (slip_core.augment.make_views);
* `inputs`: the batch entries its `forward` takes, in order (views plus "text");
* `lr`, `weight_decay`: the reference recipe (SPEC §6), used when a training config leaves them unset;
* `after_step(model, progress)`: what follows every optimizer step (CLIP's logit-scale clamp, EMA targets);
* `presets`: its named ModelConfigs; `ema_target_views`: forward-only target passes per sample (FLOPs).

Specs are keyed by (kind, image tower): CLIP with CLIP's modified ResNet is its own spec. This module declares
the three reference kinds (CLIP, SimCLR, SLIP); variants register themselves when their module is imported
(slip_core/ssl_variants.py, mim.py, resnet_clip.py). Look specs and presets up through slip_core/registry.py,
which imports every registering module, so the table it reads is complete.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from slip_core.losses import LossOptions, build_clip_loss, build_simclr_loss, build_slip_loss
from slip_core.models import CLIP, SIMCLR, SLIP, ModelConfig, vit_presets
from slip_core.optim import LOGIT_SCALE_MAX

CLIP_VIEWS, SSL_VIEWS, SLIP_VIEWS = ("image",), ("aug1", "aug2"), ("image", "aug1", "aug2")


def clamp_logit_scale(model: nn.Module, progress: float) -> None:
    """After every optimizer step: logit scale into [0, ln 100] (SPEC §6)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def nothing_after_step(model: nn.Module, progress: float) -> None:
    """For kinds with no per-step bookkeeping (SimCLR has no logit scale)."""


@dataclass(frozen=True)
class TrainSpec:
    kind: str
    build_model: Callable[[ModelConfig], nn.Module]
    build_loss: Callable[..., nn.Module]  # (LossOptions, **variant options) -> loss module
    views: tuple[str, ...]
    inputs: tuple[str, ...]
    lr: float
    weight_decay: float
    tower: str = "vit"
    presets: tuple[ModelConfig, ...] = ()
    after_step: Callable[[nn.Module, float], None] = clamp_logit_scale
    ema_target_views: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.tower

    @property
    def uses_text(self) -> bool:
        return "text" in self.inputs

    @property
    def ssl_views(self) -> int:
        return sum(v.startswith("aug") for v in self.inputs)

    def loss(self, opts: LossOptions | None = None, **variant_options) -> nn.Module:
        return self.build_loss(opts or LossOptions(), **variant_options)


_SPECS: dict[tuple[str, str], TrainSpec] = {}
_PRESETS: dict[str, ModelConfig] = {}


def register_train_spec(spec: TrainSpec) -> TrainSpec:
    """Add a spec and its presets to the table (once per (kind, tower); preset names are unique)."""
    if spec.key in _SPECS:
        raise ValueError(f"train spec {spec.key} is registered twice")
    missing = set(spec.inputs) - set(spec.views) - {"text"}
    if missing:
        raise ValueError(f"train spec {spec.key}: inputs {sorted(missing)} are neither loader views nor 'text'")
    for p in spec.presets:
        if (p.kind, p.tower) != spec.key:
            raise ValueError(f"preset {p.name} is {(p.kind, p.tower)}, not {spec.key}")
        if p.name in _PRESETS:
            raise ValueError(f"preset {p.name} is registered twice")
    _SPECS[spec.key] = spec
    _PRESETS.update({p.name: p for p in spec.presets})
    return spec


def registered_specs() -> types.MappingProxyType:
    """Read-only view of the table as registered so far (complete after `import slip_core.registry`)."""
    return types.MappingProxyType(_SPECS)


def registered_presets() -> types.MappingProxyType:
    return types.MappingProxyType(_PRESETS)


# The reference kinds (SPEC §3-6). ViT-S/B/L-16 paper dims and the tiny CPU dims of slip_core.models.
CLIP_SPEC = register_train_spec(TrainSpec(
    "clip", CLIP, build_clip_loss, CLIP_VIEWS, ("image", "text"), lr=5e-4, weight_decay=0.5,
    presets=vit_presets("clip", "CLIP")))
SIMCLR_SPEC = register_train_spec(TrainSpec(
    "simclr", SIMCLR, build_simclr_loss, SSL_VIEWS, SSL_VIEWS, lr=3.2e-3, weight_decay=0.1,
    after_step=nothing_after_step, presets=vit_presets("simclr", "SIMCLR")))
SLIP_SPEC = register_train_spec(TrainSpec(
    "slip", SLIP, build_slip_loss, SLIP_VIEWS, ("image", "text", "aug1", "aug2"), lr=3e-3, weight_decay=0.1,
    presets=vit_presets("slip", "SLIP")))
