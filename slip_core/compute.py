"""Compute estimates from model configs: FLOPs per training sample and GPU-hours for a run.

Counted analytically (matmul FLOPs = 2 x MACs; softmax, norms and activations ignored, < 2 %):
a transformer layer over T tokens of width D costs 24*T*D^2 + 4*T^2*D forward FLOPs.
Backward ~ 2x forward, so training ~ 3x forward. Used by `slip reproduce --dry-run` and bench/gpu_step.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from slip_core.registry import build_model_from_config, get_spec

# Dense peak TFLOP/s per device, bf16/fp16 tensor cores (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"V100": 125.0, "A100": 312.0, "H100": 989.0, "H200": 989.0}


def transformer_flops(tokens: int, width: int, layers: int) -> float:
    return layers * (24.0 * tokens * width**2 + 4.0 * tokens**2 * width)


def vision_forward_flops(cfg) -> float:
    if getattr(cfg, "vision_layers", ()):  # CLIP's modified ResNet (CLIP_RN50): counted by torch, see below
        return _resnet_forward_flops(cfg)
    grid = cfg.image_size // cfg.patch_size
    tokens = grid * grid + 1
    patch_embed = 2.0 * grid * grid * (3 * cfg.patch_size**2) * cfg.vision_width
    return patch_embed + transformer_flops(tokens, cfg.vision_width, cfg.vision_depth)


@functools.lru_cache(maxsize=None)
def _resnet_forward_flops(cfg) -> float:
    """Convolutions + attention pool of one image, counted by torch's FlopCounterMode on meta tensors
    (shapes only, nothing allocated): 12.2 GFLOPs for CLIP_RN50 at 224 px."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        visual = build_model_from_config(cfg).visual
        with FlopCounterMode(display=False) as counter:
            visual(torch.empty(1, 3, cfg.image_size, cfg.image_size))
    return float(counter.get_total_flops())


def text_forward_flops(cfg) -> float:
    return transformer_flops(cfg.context_length, cfg.transformer_width, cfg.transformer_layers)


def ssl_head_flops(cfg) -> float:
    d, h, e = cfg.vision_width, cfg.ssl_mlp_dim, cfg.ssl_emb_dim
    return 2.0 * (d * h + h * h + h * e)


@dataclass(frozen=True)
class SampleFlops:
    forward: float
    train: float


def flops_per_sample(cfg) -> SampleFlops:
    """Forward and training FLOPs for one sample, from what the kind's TrainSpec feeds its model: the CLIP
    view + its caption when it reads text, each SSL view through the ViT and the head, and forward-only EMA
    target passes (SLIP-MoCo v3 / BYOL: both SSL views). SLIP: 1 CLIP view + 2 SSL views + the caption."""
    spec = get_spec(cfg)
    v = vision_forward_flops(cfg)
    fwd = spec.ssl_views * (v + ssl_head_flops(cfg))
    if spec.uses_text:
        fwd += (v + 2.0 * cfg.vision_width * cfg.embed_dim + text_forward_flops(cfg)
                + 2.0 * cfg.transformer_width * cfg.embed_dim)
    target = spec.ema_target_views * (v + ssl_head_flops(cfg))
    return SampleFlops(forward=fwd + target, train=3.0 * fwd + target)


def gpu_hours(cfg, samples: int, device: str = "A100", mfu: float = 0.4) -> float:
    """Device-hours to train on `samples` samples at the given model-FLOPs utilisation."""
    return flops_per_sample(cfg).train * samples / (PEAK_TFLOPS[device] * 1e12 * mfu) / 3600.0
