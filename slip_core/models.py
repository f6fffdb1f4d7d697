"""SLIP / CLIP / SimCLR models with the reference dimensions, init and parameter names (SPEC §3).

* Vision tower: a timm `VisionTransformer` (num_classes=0 → final-LayerNorm'd class token), built from
  kwargs so ViT-S/16 can have the MoCo-v3 12 heads. Parameter names are timm's (`visual.blocks.N...`).
* Text tower: CLIP-style pre-LN transformer with causal self-attention, QuickGELU MLP and fp32
  LayerNorms, pooled at the position of the largest token id (the end token when present, SPEC §2).
  Parameter names equal the released checkpoints (`transformer.resblocks.N.attn.in_proj_weight`, ...).
* SimCLR head `image_mlp`: Linear → SyncBatchNorm → ReLU → Linear → SyncBatchNorm → ReLU → Linear, on the
  pre-projection vision feature.

A leaf module: the model classes and the base presets' dimensions. Which class and loss a `kind` trains with
is declared by its TrainSpec (slip_core/train_spec.py); build models through slip_core/registry.py.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import timm
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn
import torch.nn.functional as F

from slip_core.distributed import SyncBatchNorm


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str  # the objective: a registered TrainSpec kind ("clip", "simclr", "slip", "slip_byol", ...)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    embed_dim: int = 512  # joint image-text space (unused by SimCLR)
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_layers: int = 12
    transformer_heads: int = 8
    ssl_mlp_dim: int = 4096
    ssl_emb_dim: int = 256
    # --- SLIP variants (slip_core/ssl_variants.py, slip_core/mim.py, slip_core/resnet_clip.py); defaults = off
    vision_layers: tuple[int, ...] = ()  # non-empty: CLIP's modified ResNet with these blocks per stage
    ema_momentum: float = 0.0  # base momentum of the EMA target network (MoCo v3 0.99, BYOL 0.996)
    mim_vocab: int = 0  # BEiT-style MIM: visual-token vocabulary size
    mim_mask_ratio: float = 0.4  # fraction of patches masked (BEiT: 75 of 196)
    mim_min_block: int = 16  # min patches per masking block (BEiT pretraining: 16)
    mim_tokenizer: str = ""  # local path of a tokenizer file ("" = built-in random-projection quantizer)

    def __post_init__(self):
        # JSON / torch.load give lists; keep the field hashable and comparable
        object.__setattr__(self, "vision_layers", tuple(int(x) for x in self.vision_layers))
        if self.vision_width % self.vision_heads or self.transformer_width % self.transformer_heads:
            raise ValueError(f"{self.name}: width must be divisible by heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size must be a multiple of patch_size")

    @property
    def tower(self) -> str:
        """The image tower family: "resnet" (CLIP's modified ResNet) when `vision_layers` is set, else "vit"."""
        return "resnet" if self.vision_layers else "vit"


# Vision backbones (SPEC §3 table). ViT-S/16 is the MoCo v3 variant: timm's ViT-S shapes but 12 heads.
VISION_DIMS = {
    "VITS16": dict(vision_width=384, vision_depth=12, vision_heads=12),
    "VITB16": dict(vision_width=768, vision_depth=12, vision_heads=12),
    "VITL16": dict(vision_width=1024, vision_depth=24, vision_heads=16),
}
# Tiny CPU presets for tests and the demo: 64 px images, 8 px patches (8x8 grid), narrow towers.
# The vocabulary and 77-token context stay the reference ones so the tokenizer is shared.
# Sized so a batch-32 SLIP forward+backward takes ~0.5 s on one CPU core (~1.8M parameters besides the
# 6.3M-parameter token embedding).
TINY_DIMS = dict(image_size=64, patch_size=8, vision_width=128, vision_depth=4, vision_heads=4, embed_dim=128,
                 transformer_width=128, transformer_layers=3, transformer_heads=2, ssl_mlp_dim=512, ssl_emb_dim=128)


def vit_presets(kind: str, prefix: str, paper: dict | None = None, tiny: dict | None = None,
                backbones: tuple[str, ...] = tuple(VISION_DIMS)) -> tuple[ModelConfig, ...]:
    """`{prefix}_{VITS16,VITB16,VITL16}` and `{prefix}_VIT_TINY` configs of one kind (paper dims + `paper`
    fields, tiny dims + `tiny` fields): what each TrainSpec registers as its presets."""
    out = [ModelConfig(name=f"{prefix}_{vit}", kind=kind, **VISION_DIMS[vit], **(paper or {})) for vit in backbones]
    out.append(ModelConfig(name=f"{prefix}_VIT_TINY", kind=kind, **{**TINY_DIMS, **(tiny or {})}))
    return tuple(out)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 and cast back to the input dtype (reference, for fp16/bf16).

    fp64 inputs stay fp64 (the reference would round them to fp32; only exactness tests use fp64).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.MultiheadAttention's parameter layout.

    `use_sdpa=False` runs the straightforward softmax(QKᵀ/√d + causal −inf) V; tests check SDPA against it.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, L, D]
        n, length, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(n, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.full((length, length), float("-inf"), device=x.device).triu(1)
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + mask
            out = attn.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(), c_proj=nn.Linear(width * 4, width)))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


def build_vision(cfg: ModelConfig) -> timm_vit.VisionTransformer:
    """timm ViT, num_classes=0 (pooled class token after the final norm), LayerNorm eps 1e-6, qkv bias."""
    vit = timm_vit.VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width, depth=cfg.vision_depth,
        num_heads=cfg.vision_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token")
    # timm >= 0.9 initialises cls_token with N(0, 1e-6); the reference's timm 0.5 used trunc-normal(0.02).
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    return vit


# Named timm registrations for the two backbones timm lacks, so that tools which build a vision tower by
# timm model name (open_clip's TimmModel, used by checkpoint.export_open_clip) can rebuild ours. The reference
# registered `vit_small_mocov3_patch16_224` the same way (timm's ViT constructor, 12 heads).
def _register_timm_vit(name: str, **vit_kwargs) -> None:
    if timm.models.is_model(name):
        return

    def entrypoint(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        return timm_vit._create_vision_transformer("vit_small_patch16_224", pretrained=False, **{**vit_kwargs, **kwargs})

    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    timm.models.register_model(entrypoint)


_register_timm_vit("vit_small_mocov3_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=12)
_register_timm_vit("slip_vit_tiny_patch8_64", img_size=64, patch_size=8, embed_dim=TINY_DIMS["vision_width"],
                   depth=TINY_DIMS["vision_depth"], num_heads=TINY_DIMS["vision_heads"])
TIMM_NAMES = {  # (image_size, patch_size, width, depth, heads) -> registered timm model name
    (224, 16, 384, 12, 12): "vit_small_mocov3_patch16_224",
    (224, 16, 768, 12, 12): "vit_base_patch16_224",
    (224, 16, 1024, 24, 16): "vit_large_patch16_224",
    (64, 8, TINY_DIMS["vision_width"], TINY_DIMS["vision_depth"], TINY_DIMS["vision_heads"]): "slip_vit_tiny_patch8_64",
}


def timm_model_name(cfg: ModelConfig) -> str:
    key = (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth, cfg.vision_heads)
    if key not in TIMM_NAMES:
        raise ValueError(f"no timm model name registered for vision dims {key} of {cfg.name}")
    return TIMM_NAMES[key]


def build_image_mlp(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR projection head (default PyTorch init, SyncBatchNorm, no BN after the last layer)."""
    return nn.Sequential(OrderedDict(
        layer1=nn.Linear(in_dim, mlp_dim), bn1=SyncBatchNorm(mlp_dim), relu1=nn.ReLU(inplace=True),
        layer2=nn.Linear(mlp_dim, mlp_dim), bn2=SyncBatchNorm(mlp_dim), relu2=nn.ReLU(inplace=True),
        layer3=nn.Linear(mlp_dim, out_dim)))


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.context_length
        self.visual = build_vision(cfg)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.image_projection = nn.Parameter(torch.empty(cfg.vision_width, cfg.embed_dim))
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Reference init (SPEC §3); the vision tower keeps timm's init."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)  # as nn.MultiheadAttention
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(getattr(self, "image_projection", None), nn.Parameter):  # CLIP's ResNet projects in its attnpool
            nn.init.normal_(self.image_projection, std=self.config.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image) @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        # pool at the largest id: the end token when present (a cut caption pools at its largest id, SPEC §2)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embed": self.encode_image(image), "text_embed": self.encode_text(text),
                "logit_scale": self.logit_scale.exp()}


class SIMCLR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = build_vision(cfg)
        self.image_mlp = build_image_mlp(cfg.vision_width, cfg.ssl_mlp_dim, cfg.ssl_emb_dim)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """SimCLR has no joint embedding space: the image feature is the pooled ViT feature [N, vision_width]."""
        return self.visual(image)

    def forward(self, aug1: torch.Tensor, aug2: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aug1_embed": self.image_mlp(self.visual(aug1)), "aug2_embed": self.image_mlp(self.visual(aug2))}


class SLIP(CLIP):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.image_mlp = build_image_mlp(cfg.vision_width, cfg.ssl_mlp_dim, cfg.ssl_emb_dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor,
                aug2: torch.Tensor) -> dict[str, torch.Tensor]:
        # Three separate ViT passes, as the reference (BatchNorm-free ViT, so batching them would be
        # numerically equivalent; kept separate for fidelity of memory/compute profile).
        out = super().forward(image, text)
        out["aug1_embed"] = self.image_mlp(self.visual(aug1))
        out["aug2_embed"] = self.image_mlp(self.visual(aug2))
        return out
