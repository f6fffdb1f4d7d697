"""The complete table of model kinds and presets: build models and losses by name, look up train specs.

Importing this module imports every module that registers a TrainSpec (slip_core/train_spec.py for CLIP,
SimCLR and SLIP; ssl_variants, mim and resnet_clip for the variants), as torchtitan's `models` package does,
so every lookup below sees all of them. A new kind: a module that calls `register_train_spec`, imported here.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from slip_core import mim, resnet_clip, ssl_variants  # noqa: F401  (they register their specs on import)
from slip_core.losses import LossOptions
from slip_core.models import ModelConfig
from slip_core.train_spec import TrainSpec, registered_presets, registered_specs

MODEL_PRESETS = registered_presets()  # name -> ModelConfig, read-only
TRAIN_SPECS = registered_specs()  # (kind, tower) -> TrainSpec, read-only
KINDS = tuple(sorted({kind for kind, _ in TRAIN_SPECS}))


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset's ModelConfig with field overrides (unknown fields are a TypeError, unknown names a KeyError)."""
    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown model {name!r}; presets: {sorted(MODEL_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown ModelConfig fields {sorted(unknown)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)


def get_spec(model: ModelConfig | str) -> TrainSpec:
    """The spec of a ModelConfig, a preset name ("SLIP_VITB16") or a kind ("slip", "slip_byol"; ViT tower)."""
    if isinstance(model, str):
        if model in MODEL_PRESETS:
            model = MODEL_PRESETS[model]
        else:
            key = (model.lower(), "vit")
            if key not in TRAIN_SPECS:
                raise ValueError(f"{model!r} is neither a model preset nor a kind ({', '.join(KINDS)})")
            return TRAIN_SPECS[key]
    key = (model.kind, model.tower)
    if key not in TRAIN_SPECS:
        known = ", ".join(f"{k}/{t}" for k, t in sorted(TRAIN_SPECS))
        raise ValueError(f"{model.name}: no train spec for kind {model.kind!r} with a {model.tower} image tower "
                         f"(registered: {known})")
    return TRAIN_SPECS[key]


def build_model_from_config(cfg: ModelConfig) -> nn.Module:
    return get_spec(cfg).build_model(cfg)


def build_model(name: str, **overrides) -> nn.Module:
    """Build a preset (e.g. "SLIP_VITB16", "SLIP_VIT_TINY"), optionally overriding config fields."""
    return build_model_from_config(get_config(name, **overrides))


def build_loss(model_name_or_kind: str, ssl_scale: float = 1.0, ssl_temp: float = 0.1,
               clip_gather_with_grad: bool = False, **variant_options) -> nn.Module:
    """Loss module for a preset name or kind; `variant_options` go to the variant's builder (e.g. moco_temp)."""
    return get_spec(model_name_or_kind).loss(LossOptions(ssl_scale, ssl_temp, clip_gather_with_grad),
                                             **variant_options)
