"""CLIP with CLIP's modified ResNet image tower (presets CLIP_RN50, CLIP_RN_TINY; SPEC §8).

The vision tower is open_clip's `ModifiedResNet` (3-conv stem with average pooling, anti-aliased strided
blocks, attention pooling whose output projection maps to the joint embedding), with open_clip's init.
Parameter names therefore equal open_clip's RN50 (`visual.conv1...`, `visual.attnpool.c_proj...`), and
there is no separate `image_projection`: the attention pool projects. Text tower, logit scale and loss are
ours (SPEC §3-4), so the model trains with SLIP's improved CLIP recipe (kind "clip": the CLIP view
RandomResizedCrop scale (0.5, 1), CLIP lr/wd, SPEC §5-6). Its BatchNorms are plain per-device BatchNorm2d,
as in CLIP.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from open_clip.modified_resnet import ModifiedResNet

from slip_core.models import CLIP, TINY_DIMS, LayerNorm, ModelConfig, Transformer
from slip_core.train_spec import CLIP_SPEC, register_train_spec


class ResNetCLIP(CLIP):
    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # CLIP.__init__ would build a ViT and an image_projection
        if len(cfg.vision_layers) != 4:
            raise ValueError(f"{cfg.name}: vision_layers must have 4 stages, got {cfg.vision_layers}")
        if (cfg.vision_width * 32) % cfg.vision_heads:
            raise ValueError(f"{cfg.name}: attention-pool width {cfg.vision_width * 32} not divisible by heads")
        self.config = cfg
        self.context_length = cfg.context_length
        self.visual = ModifiedResNet(layers=list(cfg.vision_layers), output_dim=cfg.embed_dim,
                                     heads=cfg.vision_heads, image_size=cfg.image_size, width=cfg.vision_width)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()  # the text tower's reference init; ModifiedResNet initialised itself

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


# Dims of open_clip's RN50 config: layers (3, 4, 6, 3), width 64, 224 px, embed 1024, attention-pool heads =
# width·32/64; patch_size = the ResNet's stride 32. The tiny one keeps the tiny text tower.
RESNET_PRESETS = (
    ModelConfig(name="CLIP_RN50", kind="clip", image_size=224, patch_size=32, vision_layers=(3, 4, 6, 3),
                vision_width=64, vision_heads=32, embed_dim=1024),
    ModelConfig(name="CLIP_RN_TINY", kind="clip", image_size=64, patch_size=32, vision_layers=(1, 1, 1, 1),
                vision_width=16, vision_heads=8, embed_dim=128,
                **{k: TINY_DIMS[k] for k in ("transformer_width", "transformer_layers", "transformer_heads")}),
)
RESNET_CLIP_SPEC = register_train_spec(dataclasses.replace(
    CLIP_SPEC, tower="resnet", build_model=ResNetCLIP, presets=RESNET_PRESETS))
